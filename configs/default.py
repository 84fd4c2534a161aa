"""Default hyperparameters: the fields every config has.

Variant configs import this module and override a few fields. Any field can
be overridden on the command line, e.g. `--config.sam.rho=0` for the baseline.
"""

import ml_collections

from sam import perturbations


def get_config() -> ml_collections.ConfigDict:
  """The default config: ResNet-20 with SAM on CIFAR-10."""
  config = ml_collections.ConfigDict()
  # Seed of the model initialization, the data order and the augmentation.
  config.seed = 0
  # Distribution strategy: 'auto' (TPU VM -> tpu, TF_CONFIG set ->
  # multi_worker, GPUs -> mirrored, else default), 'tpu', 'multi_worker',
  # 'mirrored' or 'default' (one device).
  config.strategy = 'auto'
  # The TPU to drive (TPUClusterResolver): a pod slice's name, which makes
  # this process the slice's one client (docs/tpu.md); '' takes TPU_NAME,
  # and without it this TPU VM's own chips.
  config.tpu = ''
  # Seconds a multi-worker task waits for the other tasks in TF_CONFIG to
  # start before it stops (exit 1) naming the ones that never answered.
  config.multi_worker_timeout_secs = 600
  # Compile the train and eval steps with XLA on CPU/GPU: 'auto' (on with
  # one GPU replica), 'true' or 'false'. On a TPU everything is compiled.
  config.jit_compile = 'auto'
  # Keras dtype policy of the model: 'float32', 'mixed_bfloat16' (bfloat16
  # compute with float32 weights, logits, loss and SAM norm; fastest on TPU)
  # or 'mixed_float16' (float16 compute, for GPUs, with loss scaling).
  config.dtype_policy = 'float32'
  # Dynamic loss scaling, used under mixed_float16 only: the loss is
  # multiplied by the scale before each backward pass; a step whose
  # gradients overflow is skipped and halves the scale, and growth_steps
  # finite steps in a row double it.
  config.loss_scale = ml_collections.ConfigDict()
  config.loss_scale.initial = 2.0**15
  config.loss_scale.growth_steps = 2000

  config.dataset = ml_collections.ConfigDict()
  # One of cifar10, cifar100, fashion_mnist, synthetic (held in memory), or
  # 'tfds:NAME' for any prepared TFDS image data set, streamed from its files
  # (e.g. 'tfds:imagenet2012'; docs/imagenet.md).
  config.dataset.name = 'cifar10'
  # Where the data is: the tfds data_dir (may be gs://), or for fashion_mnist
  # the directory of the IDX .gz files. '' means the library's default
  # (~/tensorflow_datasets; /usr/share/datasets/fashion-mnist).
  config.dataset.data_dir = ''
  # Whether tfds may download and prepare a data set that is not on disk.
  config.dataset.download = False
  # Training augmentation: 'basic' (pad 4, random crop, flip),
  # 'basic_cutout' (and cutout), 'autoaugment' (basic, AutoAugment's CIFAR-10
  # policy, cutout), 'crop_brightness' (the TF SAM notebook's) or 'none'.
  config.dataset.augment = 'basic'
  # Streamed data sets ('tfds:NAME'): images are cropped and resized to
  # image_size x image_size; augment is 'inception_crop' (random-resized crop
  # and flip) or 'none'; each epoch shuffles blocks of shuffle_buffer
  # records (encoded images held in host memory) in an order of their own.
  config.dataset.image_size = 224
  config.dataset.shuffle_buffer = 10_000
  # Side of the cutout square in pixels (16 for CIFAR in DeVries & Taylor).
  config.dataset.cutout_size = 16
  # RandAugment (Cubuk et al. 2020): after the crop and flip of 'basic',
  # 'basic_cutout' and 'inception_crop', randaugment_layers operations drawn
  # from its 14, each at randaugment_magnitude (0..10, sam/autoaugment.py's
  # scale). 0 layers turn it off.
  config.dataset.randaugment_layers = 0
  config.dataset.randaugment_magnitude = 9
  # Mixup (Zhang et al. 2018), in the train step on top of `augment`: each
  # replica mixes its batch with itself rolled by one, with one weight
  # lambda ~ Beta(alpha, alpha) per step, folded to >= 1/2 (sam/mixup.py,
  # as big_vision's). 0 turns it off.
  config.dataset.mixup_alpha = 0.0
  # Fraction of training labels replaced by a uniformly drawn wrong class
  # (symmetric label noise, fixed by config.seed; test labels stay clean).
  config.dataset.label_noise = 0.0
  # Training examples held out as a validation split (fixed by config.seed),
  # evaluated beside the test set as val/*; 0 holds out none.
  config.dataset.validation_size = 0
  # Train on a fixed random subset of this many examples; -1 uses all.
  config.dataset.train_subset = -1
  # The synthetic data set: noisy class prototypes (learnable, offline).
  config.dataset.synthetic_num_classes = 10
  config.dataset.synthetic_image_shape = (32, 32, 3)
  config.dataset.synthetic_train_size = 1024
  config.dataset.synthetic_test_size = 256
  # Weight of the noise against the class prototype, in [0, 1].
  config.dataset.synthetic_noise = 0.5
  config.dataset.synthetic_seed = 0

  config.model = ml_collections.ConfigDict()
  # A name from sam.models.MODELS, e.g. resnet20, resnet56, wrn28_10, cnn.
  config.model.name = 'resnet20'

  config.sam = ml_collections.ConfigDict()
  # Neighbourhood radius; 0 trains with the plain base optimizer.
  config.sam.rho = 0.05
  # 'constant'; or 'learning_rate': rho follows the learning rate, from
  # sam.rho at its peak to sam.rho_min where the schedule ends (GSAM, Zhuang
  # et al. 2022, as big_vision), logged as train/rho.
  config.sam.rho_schedule = 'constant'
  config.sam.rho_min = 0.0
  # The perturbation, by name: 'sam', 'asam' (Kwon et al. 2021: scaled by
  # |w| + eta; ASAM's rho is typically 10x SAM's) or another of
  # sam.perturbations.REGISTRY, each with its paper, reference code and
  # options (docs/configs.md has a row for each). A variant with a state
  # keeps it in the checkpoint, so a resume cannot change the variant.
  config.sam.variant = 'sam'
  # Each variant's options (ASAM's eta, F-SAM's fsam_sigma, ...), at their
  # papers' defaults: declared once, with the variant, in
  # sam/perturbations.py (`Option`), listed in docs/configs.md.
  for option in perturbations.all_options():
    config.sam[option.name] = option.default
  # ASAM, the same as variant='asam' (kept for configs written before it).
  config.sam.adaptive = False
  # Which parameters are perturbed: '' all; 'normalization' those of the
  # normalization layers (SAM-ON, Mueller et al. 2023; they use a larger
  # rho); else a regular expression searched in the variable paths.
  config.sam.perturb_only = ''
  # The ascent pass (the gradient at w that makes eps): 'train' runs the model
  # in training mode, with Shake-Shake's and ShakeDrop's true gradient as the
  # SAM code does; 'inference' in inference mode (batch norm on its moving
  # statistics, no dropout or shake draws: tf_keras's SAM does so), and then
  # the pass at w + eps gives the new batch-norm statistics and the logged
  # accuracy, while train/loss is the loss in inference mode.
  config.sam.ascent_mode = 'train'
  # Share one perturbation across replicas (the ascent gradient is summed
  # over all replicas); False perturbs each replica with its own gradient.
  config.sam.sync_perturbation = True
  # With sync_perturbation: share one perturbation within groups of this many
  # consecutive replicas only (m-sharpness over groups, the SAM code's
  # inner_group_size); 0 shares it across all replicas.
  config.sam.inner_group_size = 0
  # Ascent steps per update: n > 1 climbs n times, each step the perturbation
  # of the gradient where the last one ended (optax.contrib.sam with
  # sync_period = n + 1); n + 1 forward/backward passes per step.
  config.sam.ascent_steps = 1
  # GSAM (Zhuang et al. 2022): descend along h - alpha * f_perp (the clean
  # gradient's part orthogonal to the SAM gradient); 0 is SAM. They use 0.1+.
  config.sam.gsam_alpha = 0.0
  # m-sharpness (SAM paper, section 4.1): one perturbation per micro-batch of
  # this many examples inside each replica; 0 uses the whole replica batch.
  config.sam.micro_batch_size = 0
  # With micro_batch_size: one perturbation for all micro-batches instead
  # (gradient accumulation: SAM on the whole batch, each pass summed over
  # the micro-batches one after the other, so that each one's activations
  # can be freed before the next; the memory saved is not measured yet).
  config.sam.accumulate_micro_batches = False
  # Run SAM every k-th step and the plain base optimizer in between, for
  # about (k + 1) / (2k) of SAM's cost; 1 is SAM at every step.
  config.sam.every_k_steps = 1
  # LookSAM (Liu et al. 2022), with every_k_steps > 1: the steps between SAM
  # steps add alpha * ||g|| / ||g_v|| * g_v to their gradient g, where g_v is
  # the last SAM gradient's part orthogonal to its clean gradient; 0 takes
  # plain steps in between. They use alpha = 0.7 with k = 5.
  config.sam.looksam_alpha = 0.0

  config.optimizer = ml_collections.ConfigDict()
  # 'sgd' (with momentum, optionally Nesterov) or 'adam'.
  config.optimizer.name = 'sgd'
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = False
  # Adam's betas and epsilon.
  config.optimizer.beta1 = 0.9
  config.optimizer.beta2 = 0.999
  config.optimizer.epsilon = 1e-7
  # Weight decay strength; 0 disables it.
  config.optimizer.weight_decay = 5e-4
  # 'l2': 0.5 * wd * ||w||^2 over kernels (ndim > 1) added to the loss, as in
  # the SAM paper, so SAM sees it; 'decoupled': w -= lr * wd * w (AdamW).
  config.optimizer.weight_decay_type = 'l2'
  # Also decay biases and batch-norm scales and offsets (the 1-D params), as
  # PyTorch's and Keras' optimizers do by default; the SAM paper does not.
  config.optimizer.decay_all_params = False
  # Clip the cross-replica gradient by this global norm; 0 disables it.
  config.optimizer.grad_clip_norm = 0.0
  # Label smoothing of the cross-entropy, in [0, 1).
  config.optimizer.label_smoothing = 0.0

  config.schedule = ml_collections.ConfigDict()
  # 'constant', 'step', 'cosine' or 'linear' (each after a linear warm-up).
  config.schedule.name = 'cosine'
  # Peak learning rate, reached after the warm-up.
  config.schedule.learning_rate = 0.1
  # Linear warm-up from 0, in epochs.
  config.schedule.warmup_epochs = 0.0
  # 'step': multiply by decay_factor at each of these epochs.
  config.schedule.decay_epochs = (60, 120, 160)
  config.schedule.decay_factor = 0.2
  # 'linear': falls from the peak to linear_end times the peak at the last
  # step (big_vision's linear_end; GSAM's ImageNet runs: 0.01).
  config.schedule.linear_end = 0.0

  # Decay of an exponential moving average of the weights (and batch-norm
  # statistics), evaluated beside them as ema_eval/*; 0 keeps none.
  config.ema_decay = 0.0

  # ReduceLROnPlateau (schedule.name='plateau') and early stopping, after
  # each evaluation, on a metric of the validation split.
  config.plateau = ml_collections.ConfigDict()
  # 'val/loss' or 'val/accuracy' (needs dataset.validation_size > 0).
  config.plateau.monitor = 'val/loss'
  # Multiply the learning rate by factor after patience evaluations without
  # improvement, down to min_scale times the initial rate.
  config.plateau.factor = 0.5
  config.plateau.patience = 3
  config.plateau.min_scale = 0.0
  # Stop after this many evaluations without improvement; 0 never stops.
  config.plateau.early_stopping_patience = 0

  # Sharpness during training (sam/probe.py): the top Hessian eigenvalue,
  # m-sharpness and, for SGD, the edge-of-stability threshold (2 + 2 momentum)
  # / learning rate, on the same training examples each time. Off at 0;
  # -1 once per epoch; its cost is logged as probe/seconds.
  config.probe = ml_collections.ConfigDict()
  config.probe.every_steps = 0
  # The probe set: num_batches batches of batch_size training examples (m of
  # the m-sharpness), the first of the run's epoch-0 order, not augmented.
  config.probe.batch_size = 128
  config.probe.num_batches = 4
  # The m-sharpness radius; 0 takes sam.rho (0.05 if that is 0 too).
  config.probe.rho = 0.0
  # Power iterations of the eigenvalue (each one H v on the probe set).
  config.probe.hessian_iterations = 20

  # Global batch size, split over all replicas.
  config.batch_size = 128
  # Global batch size of evaluation.
  config.eval_batch_size = 500
  config.num_epochs = 200.0
  # Number of training steps; -1 derives it from num_epochs.
  config.num_train_steps = -1
  # Training steps per call of the compiled loop (host round trip).
  config.steps_per_loop = 100
  # After SIGTERM (a spot TPU VM gets about 30 s before it stops) the loop
  # in flight and the checkpoint end within about this many seconds: loops
  # are shortened to fit the step and save times the run measures. 0: always
  # steps_per_loop steps (as several hosts do: their loops must agree).
  config.stop_within_secs = 20.0
  # Intervals in steps; -1 means once per epoch. Need not be multiples of
  # steps_per_loop: a loop stops early at the next interval.
  config.log_every_steps = 100
  config.eval_every_steps = -1
  config.checkpoint_every_steps = -1
  # Seconds between progress reports (steps/s, ETA) in the log.
  config.progress_every_secs = 30.0
  # How many checkpoints to keep in workdir/checkpoints.
  config.keep_checkpoints = 3
  # Resume even if the workdir's config differs in a field of
  # sam.config_checks.STRUCTURAL_FIELDS (model, data, optimizer kind).
  config.allow_structural_changes = False
  return config

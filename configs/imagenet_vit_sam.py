r"""ViT-S and ViT-B on ImageNet with AdamW, SAM or GSAM: the published settings.

Chen et al., "When Vision Transformers Outperform ResNets without
Pre-training or Strong Data Augmentations", ICLR 2022, trained ViTs from
scratch on ImageNet with SAM and Inception-style preprocessing only (their
abstract: +5.3 points top-1 for ViT-B/16). Zhuang et al., "Surrogate Gap
Guided Sharpness-Aware Minimization" (GSAM), ICLR 2022, Table 1 (top-1 on
ImageNet-v1; its SAM rows are Chen et al.'s Table 2, as GSAM's first author
writes in google-research/vision_transformer pull request 169):

  model      AdamW   SAM    GSAM    Table 4: rho_max  rho_min  alpha
  ViT-S/32   68.4    70.5   73.8             0.6      0.0      0.4
  ViT-S/16   74.4    78.1   79.5             0.6      0.0      1.0
  ViT-B/32   71.4    73.6   76.8             0.6      0.1      0.6
  ViT-B/16   74.6    79.9   81.0             0.6      0.2      0.4

and for every ViT row of Table 4: AdamW, weight decay 0.3, 300 epochs, 10k
warm-up steps, then a linear decay from 3e-3 to 3e-5, rho not adaptive.
(Both tables read in juntang-zhuang/GSAM, img/gsam_results.png and
img/gsam_hyperparam2.png.) From big_vision's GSAM config
(configs/proj/gsam/vit_i1k_gsam_no_aug.py, the authors' code): batch 4096,
Adam's betas 0.9 and 0.999 (optax's scale_by_adam, epsilon 1e-8), gradient
clipping at global norm 1.0, Inception crop and flip at 224, evaluation on
the central 224 of 256; the paper's weight decay 0.3 times the learning
rate ("effective wd=0.3*lr" there), as Keras' decoupled weight decay does
here, on kernels only (big_vision's default wd_mults); each replica perturbs
with its own gradient (gsam_gradient's "per-worker perturbation").

How this differs from that code: softmax cross-entropy (big_vision: sigmoid,
with the head's bias started at -10); the class token's output feeds the
head (its ViTs pool by the mean of the tokens, with no representation
layer); training reads all of the train split (it holds out 1%). 'sam' is
GSAM with alpha 0 and rho constant at rho_max (big_vision's GSAM code:
rho_max = rho_min and alpha = 0 is SAM); Chen et al.'s rho for their SAM
rows we could not read.

Variants `MODEL,METHOD` with MODEL one of s16, b16, s32, b32 and METHOD one
of adamw, sam, gsam (`--config=configs/imagenet_vit_sam.py:b16,gsam`). On a
pod slice (docs/imagenet.md has the gcloud commands):

  python3 main.py --config=configs/imagenet_vit_sam.py:b16,gsam \
    --workdir=gs://BUCKET/sam/vit_b16_gsam \
    --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets
"""

from configs import default
from configs import imagenet_resnet50_sam

# GSAM's Table 4: model -> (rho_max, rho_min, alpha).
GSAM = {'s32': (0.6, 0.0, 0.4), 's16': (0.6, 0.0, 1.0),
        'b32': (0.6, 0.1, 0.6), 'b16': (0.6, 0.2, 0.4)}
METHODS = ('adamw', 'sam', 'gsam')


def get_config(arg: str = 'b16,gsam'):
  model, _, method = arg.partition(',')
  if model not in GSAM or method not in METHODS:
    raise ValueError(f'configs/imagenet_vit_sam.py:{arg}: use MODEL,METHOD '
                     f'with MODEL in {tuple(GSAM)} and METHOD in {METHODS}, '
                     'e.g. b16,gsam.')
  config = imagenet_resnet50_sam.imagenet(
      default.get_config(), batch_size=4096, epochs=300, warmup_steps=10_000)
  config.model.name = f'vit_{model}'
  config.optimizer.name = 'adam'
  config.optimizer.beta1 = 0.9
  config.optimizer.beta2 = 0.999
  config.optimizer.epsilon = 1e-8
  config.optimizer.weight_decay = 0.3
  config.optimizer.weight_decay_type = 'decoupled'
  config.optimizer.grad_clip_norm = 1.0
  config.schedule.name = 'linear'
  config.schedule.learning_rate = 3e-3
  config.schedule.linear_end = 0.01
  config.sam.sync_perturbation = False
  rho_max, rho_min, alpha = GSAM[model]
  config.sam.rho = 0.0 if method == 'adamw' else rho_max
  if method == 'gsam':
    config.sam.rho_schedule = 'learning_rate'
    config.sam.rho_min = rho_min
    config.sam.gsam_alpha = alpha
  return config

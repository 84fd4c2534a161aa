"""Sharpness-Aware Minimization (SAM) in TensorFlow 2."""

"""Evaluation metrics: classifier accuracy and GAN-attack reconstruction quality."""

from fedleak.metrics.attack import nearest_images, nn_ssim, score_generated
from fedleak.metrics.classification import accuracy, class_rates, predict

__all__ = ["accuracy", "class_rates", "nearest_images", "nn_ssim", "predict", "score_generated"]

"""A user's own model, outside the hpctrain package: a small CNN for 8x8 images."""
from torch import nn


def build(feature_shape, n_outputs, task, channels=8):
    c, h, w = feature_shape
    return nn.Sequential(
        nn.Conv2d(c, channels, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(channels, channels, kernel_size=3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(channels * h * w, n_outputs))

"""Fréchet distance through torchmetrics, with any feature network (FD-digits uses the digits classifier)."""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance


class PenultimateFeatures(nn.Module):
    """Adapter: a classifier's ``features`` as the feature network torchmetrics expects."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(x)


@torch.no_grad()
def frechet_distance(feature_net: nn.Module, real: torch.Tensor, fake: torch.Tensor, batch_size: int = 512) -> float:
    """||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2)) of the two image sets' features, float64 statistics."""
    fid = FrechetInceptionDistance(feature=PenultimateFeatures(feature_net), normalize=False)
    fid.set_dtype(torch.float64)
    for images, is_real in ((real, True), (fake, False)):
        for start in range(0, len(images), batch_size):
            fid.update(images[start : start + batch_size].to(torch.float64), real=is_real)
    return float(fid.compute())


@torch.no_grad()
def class_accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    correct = 0
    for start in range(0, len(images), batch_size):
        pred = classifier(images[start : start + batch_size]).argmax(1)
        correct += (pred == labels[start : start + batch_size]).sum().item()
    return correct / len(images)

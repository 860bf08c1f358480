"""Fréchet distance through torchmetrics (float64 statistics), with any feature network.

- FD-digits: penultimate features of the digits classifier (``PenultimateFeatures``).
- FID: torchmetrics' Inception-v3 (torch-fidelity's TF-ported weights) loaded from a local file.
Reference statistics are ``.npz`` files with ``mu`` and ``sigma`` (pytorch-fid / EDM format) and,
when we write them, ``n``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from .errors import InputError

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's release asset


class PenultimateFeatures(nn.Module):
    """Adapter: a classifier's ``features`` as the feature network torchmetrics expects.

    Runs a float64 copy of the classifier (the caller's stays as it is): FD-digits features in float64.
    """

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = copy.deepcopy(classifier).double()
        self.num_features = classifier.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(x.to(torch.float64))


def inception_weights_path(weights_path: str | Path | None = None) -> Path:
    """The Inception weights file (default: the torch hub cache); an error naming it if it is absent."""
    path = Path(weights_path) if weights_path else Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if not path.is_file():
        raise InputError(
            f"Inception-v3 FID weights missing: expected {path}. They cannot be downloaded here. Fix: copy "
            f"torch-fidelity's {INCEPTION_FILE} (release v0.2.0) to that path, or set evaluate.inception_weights."
        )
    return path


class InceptionFeatures(nn.Module):
    """2048-d pool features of Inception-v3 for images in [-1, 1].

    Protocol: images are quantised to uint8 as a saved PNG would be, grayscale is repeated to 3
    channels, and the network resizes to 299x299 bilinearly (torchmetrics / torch-fidelity).
    """

    num_features = 2048  # the pool3 features FID is defined on

    def __init__(self, weights_path: str | Path | None = None):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        path = inception_weights_path(weights_path)
        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(self.num_features)], feature_extractor_weights_path=str(path))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        return self.net(x).reshape(x.shape[0], -1).to(torch.float64)


def make_fid(feature_net: nn.Module) -> FrechetInceptionDistance:
    """A torchmetrics FID metric around ``feature_net`` (float64 sums, all-reduced across processes at compute).

    The metric's sums are float64 already; ``set_dtype(float64)`` is not called because it would also
    cast ``feature_net`` (Inception would then get float64 weights and float32 inputs and fail). The
    feature networks here return float64 features, so ``compute`` returns float64 too.
    """
    return FrechetInceptionDistance(feature=feature_net, reset_real_features=False, normalize=False)


def set_reference(fid: FrechetInceptionDistance, mu: np.ndarray, sigma: np.ndarray, n: int) -> None:
    """Load reference statistics into the metric's real-side sums (inverse of its mean/cov formulas)."""
    dev = fid.real_features_sum.device  # the metric's device (a GPU's, when evaluate runs there)
    mu_t = torch.as_tensor(mu, dtype=torch.float64, device=dev)
    sigma_t = torch.as_tensor(sigma, dtype=torch.float64, device=dev)
    fid.real_features_sum = mu_t * n
    fid.real_features_cov_sum = sigma_t * (n - 1) + n * torch.outer(mu_t, mu_t)
    fid.real_features_num_samples = torch.tensor(n, dtype=torch.long, device=dev)


def clear_reference(fid: FrechetInceptionDistance) -> None:
    """Zero real-side sums (ranks other than 0, so the all-reduce counts the reference once)."""
    fid.real_features_sum = torch.zeros_like(fid.real_features_sum)
    fid.real_features_cov_sum = torch.zeros_like(fid.real_features_cov_sum)
    fid.real_features_num_samples = torch.tensor(0, dtype=torch.long, device=fid.real_features_sum.device)


def side_stats(sum_: torch.Tensor, cov_sum: torch.Tensor, n: torch.Tensor) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, n) from a metric's feature sums, with the metric's own formulas."""
    n_ = int(n)
    mu = sum_ / n_
    sigma = (cov_sum - n_ * torch.outer(mu, mu)) / (n_ - 1)
    return mu.cpu().numpy(), sigma.cpu().numpy(), n_


def save_stats(path: str | Path, mu: np.ndarray, sigma: np.ndarray, n: int) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, mu=mu, sigma=sigma, n=np.int64(n))
    tmp.replace(path)
    return path


def load_stats(path: str | Path, default_n: int = 50_000) -> tuple[np.ndarray, np.ndarray, int]:
    """``mu``, ``sigma`` (and ``n`` when present) from a pytorch-fid / EDM style ``.npz``."""
    try:
        with np.load(path, allow_pickle=False) as f:
            mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
            n = int(f["n"]) if "n" in f.files else default_n
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise InputError(f"reference statistics {path} unreadable ({e}). Fix: give an .npz with arrays 'mu' and 'sigma'.") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise InputError(f"reference statistics {path}: mu {mu.shape} and sigma {sigma.shape} do not fit together. Fix: mu (D,), sigma (D, D).")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()) or n < 2:
        raise InputError(f"reference statistics {path}: mu / sigma hold NaN or Inf, or n < 2. Fix: recompute the statistics.")
    return mu, sigma, n


@torch.no_grad()
def frechet_distance(feature_net: nn.Module, real: torch.Tensor, fake: torch.Tensor, batch_size: int = 512) -> float:
    """||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2)) of two image sets' features."""
    fid = make_fid(PenultimateFeatures(feature_net) if hasattr(feature_net, "features") else feature_net)
    for images, is_real in ((real, True), (fake, False)):
        for start in range(0, len(images), batch_size):
            fid.update(images[start : start + batch_size].to(torch.float64), real=is_real)
    return float(fid.compute())


@torch.no_grad()
def channel_stats(x: torch.Tensor, prefix: str, channels: int = 4) -> dict[str, float]:
    """Mean and std of each of the first ``channels`` channels of a batch: over-saturation shows as std drift."""
    out = {}
    for c in range(min(x.shape[1], channels)):
        out[f"{prefix}_mean_c{c}"], out[f"{prefix}_std_c{c}"] = float(x[:, c].mean()), float(x[:, c].std())
    return out


def class_accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    correct = 0
    for start in range(0, len(images), batch_size):
        pred = classifier(images[start : start + batch_size]).argmax(1)
        correct += (pred == labels[start : start + batch_size]).sum().item()
    return correct / len(images)


def to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images, 1 or 3 channels -> uint8 RGB (what CLIP's image processor expects)."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x


class _TensorFeatures(nn.Module):
    """CLIPModel whose get_*_features return the embedding tensor: transformers 5 returns an output object
    (the projected embedding in ``pooler_output``), torchmetrics 1.9's CLIPScore expects the tensor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args, **kw) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kw))

    def get_text_features(self, *args, **kw) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kw))


def make_clip_score(model_dir: str | Path):
    """torchmetrics' CLIPScore on a local CLIP directory (CLIPModel + CLIPProcessor files); nothing is downloaded.

    CLIPScore = 100 * max(mean cos(image embedding, text embedding), 0) (Hessel et al. 2021).
    """
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise InputError(
            f"evaluate.clip_model: {path} is not a CLIP model directory (no config.json). Fix: point it at a local "
            "CLIPModel.save_pretrained + CLIPProcessor.save_pretrained folder, e.g. a snapshot of openai/clip-vit-large-patch14."
        )

    def load():
        try:
            return _TensorFeatures(CLIPModel.from_pretrained(str(path), local_files_only=True).eval()), CLIPProcessor.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise InputError(f"evaluate.clip_model: {path} does not load as CLIPModel + CLIPProcessor: {str(e).splitlines()[0]}") from None

    return CLIPScore(model_name_or_path=load)

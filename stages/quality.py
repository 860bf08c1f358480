"""Image quality against a reference set, shared by evaluate and distill's quality probe: the feature
network, the reference statistics (computed once, cached in the store) and the probe itself."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dmd_core.digits import DigitsClassifier, load_digits_data
from dmd_core.errors import InputError
from dmd_core.metrics import (
    InceptionFeatures,
    PenultimateFeatures,
    channel_stats,
    inception_weights_path,
    load_stats,
    make_fid,
    save_stats,
    set_reference,
    side_stats,
)
from dmd_core.shards import sample_labels, sample_noise

from .config import EvaluateConfig, PipelineConfig
from .contract import content_key
from .store import Store, open_store

QUALITY_VERSION = "evaluate/1"  # part of the reference statistics' key: bump when the statistics computed change


def features_digest(e: EvaluateConfig, store: Store) -> str:
    """Digest of the feature network (and the classifier's weights, for FD-digits)."""
    if e.features == "digits":
        if not e.classifier or not Path(e.classifier, "model.safetensors").is_file():
            raise InputError(f"evaluate.features=digits needs evaluate.classifier, a `dmd toy classifier` directory; got {e.classifier!r}. "
                             "Fix: point evaluate.classifier at one (the embedded one is data/classifier).")
        return "digits:" + store.digest(e.classifier)
    return "inception:" + store.digest(inception_weights_path(e.inception_weights))


def reference_digest(e: EvaluateConfig, store: Store) -> str:
    """Digest of the reference set the generator is compared with."""
    if e.reference == "digits":
        return "sklearn-digits-1797"
    path = Path(e.reference)
    if not path.is_file():
        raise InputError(f"evaluate.reference: no such file {path}. Fix: give 'digits' or an .npz with mu and sigma.")
    return "npz:" + store.digest(path)


def reference_key(e: EvaluateConfig, store: Store) -> str:
    """Key of the cached reference statistics: (feature network, reference set)."""
    return content_key("reference", {}, {"features": features_digest(e, store), "reference": reference_digest(e, store)}, QUALITY_VERSION)




def make_features(e: EvaluateConfig, classifier: DigitsClassifier | None) -> torch.nn.Module:
    return PenultimateFeatures(classifier) if e.features == "digits" else InceptionFeatures(e.inception_weights)


def reference_stats(cfg: PipelineConfig, key: str, features: torch.nn.Module, device: torch.device, rank: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """Reference statistics, computed once per (dataset, features) and cached (verified) in <store>/reference/<key>/."""
    e = cfg.evaluate
    if e.reference != "digits":
        return load_stats(e.reference)
    store = open_store(cfg.store)
    out = store.side_dir("reference", key)
    if store.cached_side_output(out):
        return load_stats(out / "stats.npz")
    fid = make_fid(features).to(device)
    real, _ = load_digits_data()
    with torch.no_grad():
        for s in range(0, len(real), e.batch_size):
            fid.update(real[s : s + e.batch_size].to(device, torch.float64), real=True)
    mu, sigma, n = side_stats(fid.real_features_sum, fid.real_features_cov_sum, fid.real_features_num_samples)
    if rank == 0:

        def write(work: Path) -> list[str]:
            save_stats(work / "stats.npz", mu, sigma, n)
            return ["stats.npz"]

        up = {"features": features_digest(e, store), "reference": reference_digest(e, store)}
        store.publish_side_output(out, "reference", key, QUALITY_VERSION, up, write)
    return mu, sigma, n


class QualityProbe:
    """FD (evaluate.features against evaluate.reference) and class accuracy of a fixed sample, for tracking
    a generator during training: the same noise and labels every time (evaluate.seed), one process."""

    def __init__(self, cfg: PipelineConfig, num_samples: int, shape: tuple[int, ...], num_classes: int, device: torch.device, class_of=None):
        e = cfg.evaluate
        self.classifier = DigitsClassifier.load(e.classifier).to(device) if e.classifier else None
        self.features = make_features(e, self.classifier)
        self.reference = reference_stats(cfg, reference_key(e, open_store(cfg.store)), self.features, device)
        idx = range(num_samples)
        self.z = sample_noise(e.seed, idx, shape).to(device)
        labels = sample_labels(idx, num_classes)
        self.labels = None if labels is None else labels.to(device)
        # the class each sample should show (None: no accuracy, e.g. prompts without labels)
        self.classes = self.labels if class_of is None else class_of(self.labels)
        self.batch_size, self.device = e.batch_size, device

    @torch.no_grad()
    def __call__(self, sample: Callable) -> dict:
        """``sample(z, labels, idx) -> (model-space x, pixels)``: FD, accuracy and per-channel mean/std of x (first 4)."""
        fid = make_fid(self.features).to(self.device)
        set_reference(fid, *self.reference)
        correct, xs = 0, []
        for s in range(0, len(self.z), self.batch_size):
            labels = None if self.labels is None else self.labels[s : s + self.batch_size]
            x, pixels = sample(self.z[s : s + self.batch_size], labels, range(s, min(s + self.batch_size, len(self.z))))
            pixels = pixels.float().clamp(-1, 1)
            fid.update(pixels.to(torch.float64), real=False)
            if self.classifier is not None and self.classes is not None:
                correct += int((self.classifier(pixels).argmax(1) == self.classes[s : s + self.batch_size]).sum())
            xs.append(x.float())
        x = torch.cat(xs)
        out = {"probe_fd": float(fid.compute())}
        out["probe_class_accuracy"] = correct / len(self.z) if self.classifier is not None and self.classes is not None else None
        return out | channel_stats(x, "probe")

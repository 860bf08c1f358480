"""The embedded default: scikit-learn's 8x8 digits, a tiny EDM teacher and a digits classifier.

Everything here runs offline on a CPU in minutes; ``dmd toy teacher|classifier`` call these functions
and commit the weights under data/.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .denoisers import Denoiser, EDMDenoiser, Parametrization, VPDenoiser
from .errors import InputError
from .losses import ddpm_denoising_loss, edm_denoising_loss, edm_training_sigmas

Tensor = torch.Tensor

NUM_CLASSES = 10
IMAGE_SHAPE = (1, 8, 8)


def load_digits_data() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as float32 images in [-1, 1] of shape (N, 1, 8, 8), and their labels (N,)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(d.images.astype(np.float32) / 16.0 * 2.0 - 1.0).unsqueeze(1)
    return images, torch.from_numpy(d.target.astype(np.int64))


def digits_split(n: int, seed: int = 0, test_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """A fixed train/test index split."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


# ---------------------------------------------------------------- teacher


def toy_unet(num_classes: int = NUM_CLASSES) -> UNet2DModel:
    """A ~0.7 M parameter class-conditional UNet for 1x8x8 images; class ``num_classes`` is the null class."""
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=16,
        attention_head_dim=32,
        num_class_embeds=num_classes + 1,
    )


@dataclass
class TeacherTraining:
    steps: int = 4000
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 200
    ema_decay: float = 0.999
    label_dropout: float = 0.1  # replaced by the null class so classifier-free guidance works
    seed: int = 0


def vp_scheduler():
    """Stable Diffusion's training schedule (scaled_linear betas 0.00085..0.012, T = 1000), epsilon prediction."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="epsilon")


def train_toy_teacher(cfg: TeacherTraining, progress: bool = True, kind: str = "edm") -> tuple[Denoiser, list[float]]:
    """Train the digits teacher, EDM (its loss and preconditioning) or VP (DDPM's epsilon loss on
    ``vp_scheduler()``); returns the EMA denoiser and the losses."""
    torch.manual_seed(cfg.seed)
    param = Parametrization(kind=kind, num_classes=NUM_CLASSES, null_class=NUM_CLASSES, image_shape=IMAGE_SHAPE)
    if kind == "edm":
        den: Denoiser = EDMDenoiser(toy_unet(), param)

        def loss(den: Denoiser, x: Tensor, y: Tensor, gen: torch.Generator) -> Tensor:
            sigma = edm_training_sigmas(len(x), gen)
            return edm_denoising_loss(den, x, sigma, torch.randn(x.shape, generator=gen), y)
    else:
        sched = vp_scheduler()
        den = VPDenoiser(toy_unet(), param, sched.alphas_cumprod, dict(sched.config))

        def loss(den: Denoiser, x: Tensor, y: Tensor, gen: torch.Generator) -> Tensor:
            t = torch.randint(0, den.num_train_timesteps, (len(x),), generator=gen)
            return ddpm_denoising_loss(den, x, t, torch.randn(x.shape, generator=gen), y)

    return train_class_conditional(den, cfg, loss, "teacher", progress)


def train_class_conditional(den: Denoiser, cfg, loss: Callable[[Denoiser, Tensor, Tensor, torch.Generator], Tensor], desc: str,
                            progress: bool = True) -> tuple[Denoiser, list[float]]:  # fmt: skip
    """The loop of the embedded class-conditional teachers: Adam with a linear warm-up, labels dropped to the null
    class (so that classifier-free guidance works), an EMA copy returned with the losses. ``loss(den, x, y, gen)``
    draws its noise levels and noise from ``gen``; ``cfg`` has seed, steps, batch_size, lr, warmup, label_dropout,
    ema_decay."""
    gen = torch.Generator().manual_seed(cfg.seed)
    images, labels = load_digits_data()
    den = den.train()
    ema = copy.deepcopy(den).eval().requires_grad_(False)
    opt = torch.optim.Adam(den.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup))
    losses = []
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress)
    for _ in bar:
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=gen)
        x, y = images[idx], labels[idx].clone()
        y[torch.rand(cfg.batch_size, generator=gen) < cfg.label_dropout] = NUM_CLASSES
        value = loss(den, x, y, gen)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), den.parameters()):
                pe.lerp_(p, 1 - cfg.ema_decay)
        losses.append(value.item())
        bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
    return ema, losses


# ---------------------------------------------------------------- classifier


class DigitsClassifier(nn.Module):
    """A small CNN; its penultimate layer is the feature space of FD-digits."""

    def __init__(self, width: int = 32, num_features: int = 64, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.config = {"width": width, "num_features": num_features, "num_classes": num_classes}
        self.num_features = num_features  # torchmetrics' FID reads this attribute
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.SiLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * 4, num_features), nn.SiLU(),
        )  # fmt: skip
        self.head = nn.Linear(num_features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features of images in [-1, 1]."""
        return self.body(x.to(self.head.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path / "model.safetensors"))
        (path / "config.json").write_text(json.dumps(self.config, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "DigitsClassifier":
        path = Path(path)
        if not (path / "model.safetensors").is_file() or not (path / "config.json").is_file():
            raise InputError(
                f"digits classifier missing: expected {path}/model.safetensors and config.json. "
                "Fix: run `dmd toy classifier`."
            )
        model = cls(**json.loads((path / "config.json").read_text()))
        model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
        return model.eval().requires_grad_(False)


@dataclass
class ClassifierTraining:
    epochs: int = 40
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    noise_augment: float = 0.1  # small Gaussian noise so generated (imperfect) digits stay in-distribution
    seed: int = 0


def train_digits_classifier(cfg: ClassifierTraining, progress: bool = True) -> tuple[DigitsClassifier, float]:
    """Train on a fixed 80% split; returns the model and its accuracy on the held-out 20%."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    images, labels = load_digits_data()
    train_idx, test_idx = digits_split(len(images), seed=cfg.seed)
    xtr, ytr = images[train_idx], labels[train_idx]
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = (len(xtr) + cfg.batch_size - 1) // cfg.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    for _ in tqdm(range(cfg.epochs), desc="classifier", disable=not progress):
        perm = torch.randperm(len(xtr), generator=gen)
        for b in range(steps_per_epoch):
            idx = perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            x = xtr[idx] + cfg.noise_augment * torch.randn(xtr[idx].shape, generator=gen)
            loss = nn.functional.cross_entropy(model(x), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval().requires_grad_(False)
    return model, classifier_accuracy(model, images[test_idx], labels[test_idx])


@torch.no_grad()
def classifier_accuracy(model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (model(images).argmax(1) == labels).double().mean().item()

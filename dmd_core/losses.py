"""Losses, each a small function with its equation named (docs/math.md)."""

from __future__ import annotations

from pathlib import Path

import torch

from .denoisers import EDMDenoiser

Tensor = torch.Tensor


def edm_weight(sigma: Tensor, sigma_data: float) -> Tensor:
    """EDM's loss weight lambda(sigma) = 1/sigma^2 + 1/sigma_data^2 (Karras et al. 2022, Table 1; docs/math.md §7)."""
    return 1 / sigma**2 + 1 / sigma_data**2


def edm_denoising_loss(
    den: EDMDenoiser, x: Tensor, sigma: Tensor, noise: Tensor, class_labels: Tensor | None = None
) -> Tensor:
    """E[ lambda(sigma) * ||D(x + sigma n; sigma) - x||^2 ] (EDM, Eq. 2 with Table 1's weight), per-pixel mean."""
    s = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
    pred = den(x + s * noise, sigma, class_labels)
    return (edm_weight(s, den.sigma_data) * (pred - x) ** 2).mean()


def ddpm_denoising_loss(den, x: Tensor, t: Tensor, noise: Tensor, class_labels: Tensor | None = None) -> Tensor:
    """E[ ||eps_theta(sqrt(abar_t) x + sqrt(1 - abar_t) eps, t) - eps||^2 ] (DDPM's simple loss; docs/math.md §2), per-element mean.

    ``den`` is an epsilon-prediction ``VPDenoiser``; t are integer timesteps.
    """
    abar = den.alphas_cumprod.to(x.device)[t].reshape(-1, 1, 1, 1).to(x.dtype)
    x_t = abar.sqrt() * x + (1 - abar).sqrt() * noise
    return torch.nn.functional.mse_loss(den.unet(x_t, t, class_labels=class_labels).sample, noise)


def edm_training_sigmas(n: int, generator: torch.Generator, p_mean: float = -1.2, p_std: float = 1.2) -> Tensor:
    """Training noise levels ln(sigma) ~ N(P_mean, P_std^2) (EDM, Table 1)."""
    return (torch.randn(n, generator=generator, dtype=torch.float64) * p_std + p_mean).exp()


# ---------------------------------------------------------------- distribution matching (DMD, Sec. 3.2)


def dm_normalizer(x: Tensor, p_real: Tensor) -> Tensor:
    """w = mean over (C, H, W) of |x - p_real|, per sample: DMD's CS / ||mu_base(x_t, t) - x||_1 (Eq. 8; docs/math.md §6 step 4)."""
    return (x - p_real).abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)


def distribution_matching_loss(x: Tensor, p_real: Tensor, p_fake: Tensor) -> Tensor:
    """0.5 * mean((x - sg(x - grad))^2) with grad = (p_fake - p_real) / w (DMD Eq. 7-8, docs/math.md §6 steps 4-6).

    Its gradient with respect to x is grad / x.numel(): x moves along p_real - p_fake.
    NaN or Inf in grad (e.g. w = 0) are replaced by 0.
    """
    with torch.no_grad():
        grad = (p_fake - p_real) / dm_normalizer(x, p_real)
        target = x - torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
    return 0.5 * torch.nn.functional.mse_loss(x, target)


def eps_mse_loss(eps_pred: Tensor, eps: Tensor) -> Tensor:
    """||eps_theta(x_t, t) - eps||^2 (DDPM's simple loss), per-element mean: the VP fake-score loss (docs/math.md §7)."""
    return torch.nn.functional.mse_loss(eps_pred, eps)


# ---------------------------------------------------------------- regression (DMD, Sec. 3.3)


def pseudo_huber_loss(x: Tensor, y: Tensor) -> Tensor:
    """sqrt(||x - y||^2 + c^2) - c per sample, c = 0.00054 sqrt(dim) (iCT, Song & Dhariwal 2023); batch mean (docs/math.md §8)."""
    dim = x[0].numel()
    c = 0.00054 * dim**0.5
    sq = (x - y).flatten(1).pow(2).sum(1)
    return ((sq + c * c).sqrt() - c).mean()


def l2_loss(x: Tensor, y: Tensor) -> Tensor:
    """Mean squared error."""
    return torch.nn.functional.mse_loss(x, y)


# torchvision backbones LPIPS loads from the torch hub cache (never downloaded here).
LPIPS_BACKBONE_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}


def lpips_backbone_path(net: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONE_FILES[net]


class LPIPSLoss(torch.nn.Module):
    """LPIPS (Zhang et al. 2018) through the ``lpips`` package, as DMD's regression loss (docs/math.md §8).

    Inputs in [-1, 1]; grayscale repeated to 3 channels; images smaller than 224 upsampled bilinearly
    to 224 first, as the DMD re-implementations do. ``random_backbone=True`` skips the ImageNet weights
    (tests only: the values are then not perceptual).
    """

    def __init__(self, net: str = "vgg", random_backbone: bool = False):
        super().__init__()
        import lpips

        from .errors import InputError

        if not random_backbone and not lpips_backbone_path(net).is_file():
            raise InputError(
                f"LPIPS needs the ImageNet {net} weights at {lpips_backbone_path(net)} (torch hub cache, $TORCH_HOME); "
                "they cannot be downloaded here. Fix: copy that file there, or choose "
                "--set distill.regression_loss=pseudo_huber (or l2)."
            )
        self.lpips = lpips.LPIPS(net=net, pretrained=True, pnet_rand=random_backbone, verbose=False).eval()
        self.lpips.requires_grad_(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x, y = x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)
        if x.shape[-1] < 224:
            x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
            y = torch.nn.functional.interpolate(y, size=(224, 224), mode="bilinear", align_corners=False)
        return self.lpips(x, y).mean()


class DecodedLoss(torch.nn.Module):
    """l(decode(x), decode(y)) for latent models: the regression on images, through the frozen decoder.

    DMD's Stable Diffusion regression is LPIPS on VAE-decoded images; the gradient reaches the latents
    through the decoder (its weights stay frozen). ``size``: resize the decoded images first (bilinear,
    antialiased), which bounds the memory of both the decoder's backward and LPIPS (docs/math.md §8).
    """

    def __init__(self, loss: torch.nn.Module, decode, size: int | None = None):
        super().__init__()
        self.loss, self.decode, self.size = loss, decode, size

    def _resize(self, x: Tensor) -> Tensor:
        if self.size is None or x.shape[-1] == self.size:
            return x
        return torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            target = self._resize(self.decode(y))
        return self.loss(self._resize(self.decode(x)), target)

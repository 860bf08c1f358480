"""DMD's two-optimizer step (Yin et al. 2024, Algorithm 1; DMD2's extra fake-score updates and GAN term):

    generator:   loss_G over the micro-batches, backward, clip, one optimizer step      generator_update
    fake score:  n x (denoising loss on stopgrad(G(z)) [+ w_D loss_D], backward, clip, step)   fake_score_updates

The networks may be wrapped (DDP). ``acc`` is Accelerate's Accelerator or any object with its four methods:
``backward(loss)``, ``no_sync(net)``, ``autocast()``, ``clip_grad_norm_(params, max_norm)``. Logged scalars
are summed on the device (``Sums``) and never read back here: reading a float waits for the device.
The record_function names label the phases in a torch.profiler trace (benchmarks/gpu_cifar.py reads them).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable

import torch
from torch.profiler import record_function

from .dmd import BackwardSimulation, FakeScoreLoss, GANLogits, GeneratorLoss, OneStep, SampleRNG, frozen
from .gan import discriminator_loss

Tensor = torch.Tensor


class Sums(dict):
    """Logged scalars, each summed on the device over micro-batches and updates with its weight."""

    def add(self, name: str, v: Tensor, weight: float) -> None:
        self[name] = self.get(name, 0.0) + v.detach().float() * weight


def generator_update(acc, gen, real, fake, optimizer, loss: GeneratorLoss, draws: list[tuple], pairs: list[tuple] | None,
                     max_grad_norm: float | None, sums: Sums) -> tuple[list[Tensor], list[Tensor | None], Tensor]:  # fmt: skip
    """loss_G = loss_DM + lambda_reg * l(G(z_ref), y_ref) [+ w_G loss_GAN] over the micro-batches, then one step.

    ``draws``: per micro-batch (rng, z, labels); ``pairs``: per micro-batch (z_ref, y_ref, labels_ref) or None.
    Returns stopgrad(G(z)) and its labels per micro-batch (the fake score trains on them) and the gradient norm."""
    A = len(draws)
    # the GAN term's gradient goes through the fake score and head to G only, backward included
    held = loss.adversarial.fake if loss.adversarial is not None else None
    xs, labels_dm = [], []
    with record_function("dmd.generator"):
        for m, (rng, z, labels) in enumerate(draws):
            z_ref, y_ref, labels_ref = pairs[m] if pairs is not None else (None, None, None)
            sync = acc.no_sync(gen) if m < A - 1 else nullcontext()
            freeze = frozen(held) if held is not None else nullcontext()
            with sync, freeze, acc.autocast():
                loss_g, terms, x = loss(gen, real, fake, z, labels, rng, z_ref, y_ref, labels_ref)
                with record_function("dmd.generator.backward"):
                    acc.backward(loss_g / A)
            xs.append(x)
            labels_dm.append(labels)
            for k, v in (*terms.items(), ("loss_g", loss_g)):
                sums.add(k, v, 1 / A)
        with record_function("dmd.generator.update"):
            norm = acc.clip_grad_norm_(gen.parameters(), max_grad_norm or math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return xs, labels_dm, norm


def fake_score_updates(acc, fake, optimizer, loss: FakeScoreLoss, batch: Callable[[int, int], tuple[Tensor, Tensor | None, SampleRNG]],
                       updates: int, micro_batches: int, max_grad_norm: float | None, sums: Sums,
                       discriminator: DiscriminatorLoss | None = None, discriminator_weight: float = 0.0) -> Tensor:  # fmt: skip
    """``updates`` denoising updates of the fake score, each over ``micro_batches``; with DMD2's GAN term
    loss_fake + w_D loss_D. ``batch(k, m)``: (x = stopgrad(G(z)), labels, rng) of update k, micro-batch m.
    Returns the last update's gradient norm."""
    A = micro_batches
    with record_function("dmd.fake_score"):
        share = 1 / A / updates
        for k in range(updates):
            for m in range(A):
                x, labels, rng = batch(k, m)
                sync = acc.no_sync(fake) if m < A - 1 else nullcontext()
                with sync, acc.autocast():
                    loss_f = loss(fake, x, labels, rng)
                    total = loss_f
                    if discriminator is not None:
                        gan = discriminator(x, labels, rng)
                        total = loss_f + discriminator_weight * gan["loss_gan_d"]
                        for name, v in gan.items():
                            sums.add(name, v, share)
                    with record_function("dmd.fake_score.backward"):
                        acc.backward(total / A)
                sums.add("loss_fake", loss_f, share)
            with record_function("dmd.fake_score.update"):
                norm = acc.clip_grad_norm_(fake.parameters(), max_grad_norm or math.inf)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    return norm


@torch.no_grad()
def generator_samples(gen, one_step: OneStep, simulation: BackwardSimulation | None, z: Tensor, labels: Tensor | None, rng: SampleRNG) -> Tensor:
    """stopgrad(G(z)) as the generator's update makes them (k-step generators: at a simulated step): the
    input of DMD2's extra fake-score updates."""
    if simulation is None:
        return one_step(gen, z, labels).float()
    inputs, levels = simulation(gen, z, labels, rng)
    return gen(inputs, levels, labels).float()


class DiscriminatorLoss:
    """DMD2's head turn (docs/math.md §12): loss_D = softplus(D(x)) + softplus(-D(x_real)) on a real batch the
    rng draws (with its classes) against x = stopgrad(G(z)); with the head's P(real) on each, for the logs.

    ``fake`` is the callable to run (it may be a DDP wrapper: this forward belongs to the fake score's
    backward), ``module`` the fake score itself, which carries ``gan_tap`` and ``gan_head``."""

    def __init__(self, gan_logits: GANLogits, fake: Callable, module: torch.nn.Module, real_images: Tensor, real_labels: Tensor | None):
        self.gan_logits, self.fake, self.module = gan_logits, fake, module
        self.real_images, self.real_labels = real_images, real_labels

    def __call__(self, x: Tensor, labels: Tensor | None, rng: SampleRNG) -> dict[str, Tensor]:
        idx = rng.randint(0, len(self.real_images))
        real_x = self.real_images[idx]
        real_labels = self.real_labels[idx] if self.real_labels is not None else None
        tap, head = self.module.gan_tap, self.module.gan_head
        logits_real = self.gan_logits(self.fake, tap, head, real_x, real_labels, rng)
        logits_fake = self.gan_logits(self.fake, tap, head, x.detach(), labels, rng)
        return {
            "loss_gan_d": discriminator_loss(logits_real, logits_fake),
            "d_real": torch.sigmoid(logits_real).mean().detach(),  # the head's P(real) on real / generated images
            "d_fake": torch.sigmoid(logits_fake).mean().detach(),
        }

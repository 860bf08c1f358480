"""DMD iterations through GeneratorLoss and FakeScoreLoss: golden numbers on the digits teacher, and the
rules of the regression batch (G is never run on it when it does not count).

The golden run takes two iterations: at step 0 the fake score still equals the teacher, so loss_DM is 0
and only step 1 pins the distribution matching term.
"""

from __future__ import annotations

import pytest
import torch

from conftest import ROOT, make_edm_teacher
from dmd_core import load_denoiser
from dmd_core.dmd import DistributionMatchingLoss, DMDSettings, FakeScoreLoss, GeneratorLoss, OneStep, SampleRNG, random_labels
from dmd_core.losses import pseudo_huber_loss

TEACHER = ROOT / "data" / "teacher"
B, SEED, STREAM_GENERATOR, STREAM_FAKE = 4, 7, 0, 10  # the streams stages/distill.py draws from

# Measured once with this test's recipe (torch 2.14.1 CPU, 1 thread). First taken equal, to the last bit, to
# what the loss code of stages/distill.py Trainer.step computed before it moved into dmd_core (commit
# 2b74917); re-measured when the draws became counter-based (Philox, distill/3): step 0's generator terms
# did not change (z and the pairs' terms match; loss_DM is 0 either way), the draws of t and eps did.
# Step 0: the fake score is the teacher, so p_fake == p_real and loss_DM is exactly 0 (no DM gradient yet).
GOLDEN = [
    {
        "loss_dm": 0.0,
        "loss_reg": 6.960209846496582,
        "loss_g": 1.7400524616241455,
        "grad_norm_g": 3.9481897354125977,
        "loss_fake": 1.0796403884887695,
        "grad_norm_fake": 6.0698699951171875,
        "gen_conv_in_sum": -4.794289623532677,  # sum of G's conv_in.weight after AdamW's step
        "fake_conv_in_sum": -4.789289495820412,
    },
    {
        "loss_dm": 0.002617072779685259,
        "loss_reg": 7.168155670166016,
        "loss_g": 1.7946560382843018,
        "grad_norm_g": 3.6947529315948486,
        "loss_fake": 0.5031883120536804,
        "grad_norm_fake": 3.063788890838623,
        "gen_conv_in_sum": -4.795326506820857,
        "fake_conv_in_sum": -4.788674964947859,
    },
]
TEACHER_CONV_IN_SUM = -4.791494398901705  # before any step: the updates above move it by ~1e-3, far above 1e-6 rel


def dmd_steps(n: int) -> list[dict[str, float]]:
    """``n`` DMD iterations as Trainer.step does them (1 process, no accumulation, lr 1e-4, fused AdamW)."""
    torch.set_num_threads(1)
    real = load_denoiser(TEACHER)
    gen, fake = (load_denoiser(TEACHER).requires_grad_(True).train() for _ in range(2))
    opt_g, opt_f = (torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.01, fused=True) for net in (gen, fake))
    gen_loss = GeneratorLoss(DMDSettings(guidance_scale=1.0, regression_weight=0.25), pseudo_huber_loss)
    fake_loss = FakeScoreLoss.for_teacher(real)
    pairs = torch.Generator().manual_seed(123)
    out = []
    for step in range(n):
        indices = range(step * B, (step + 1) * B)
        rng = SampleRNG(SEED, STREAM_GENERATOR, step, indices)
        z = rng.randn((1, 8, 8))
        labels = random_labels(rng, 10)
        z_ref = torch.randn(B, 1, 8, 8, generator=pairs)
        y_ref = torch.rand(B, 1, 8, 8, generator=pairs) * 2 - 1
        labels_ref = torch.randint(0, 10, (B,), generator=pairs)
        loss_g, terms, x = gen_loss(gen, real, fake, z, labels, rng, z_ref, y_ref, labels_ref)
        loss_g.backward()
        grad_norm_g = torch.nn.utils.clip_grad_norm_(gen.parameters(), 10.0)
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        loss_f = fake_loss(fake, x, labels, SampleRNG(SEED, STREAM_FAKE, step, indices))
        loss_f.backward()
        grad_norm_fake = torch.nn.utils.clip_grad_norm_(fake.parameters(), 10.0)
        opt_f.step()
        opt_f.zero_grad(set_to_none=True)
        values = {**terms, "loss_g": loss_g, "grad_norm_g": grad_norm_g, "loss_fake": loss_f, "grad_norm_fake": grad_norm_fake}
        values["gen_conv_in_sum"] = gen.unet.conv_in.weight.detach().double().sum()
        values["fake_conv_in_sum"] = fake.unet.conv_in.weight.detach().double().sum()
        out.append({k: v.item() for k, v in values.items()})
    return out


def test_two_dmd_steps_match_golden_values():
    assert load_denoiser(TEACHER).unet.conv_in.weight.double().sum().item() == pytest.approx(TEACHER_CONV_IN_SUM, rel=1e-12)
    got = dmd_steps(2)
    for step, (g, want) in enumerate(zip(got, GOLDEN)):
        for k, v in want.items():  # abs: step 0's loss_DM is 0 exactly on 1 thread, ~6e-13 on 2
            assert g[k] == pytest.approx(v, rel=1e-6, abs=1e-10), f"step {step}: {k}"


class Counting:
    """Wraps a denoiser and records the batch size of every call."""

    def __init__(self, den):
        self.den, self.batches = den, []

    def __call__(self, x, level, labels=None, guidance_scale=1.0):
        self.batches.append(len(x))
        return self.den(x, level, labels, guidance_scale)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_edm_teacher(tmp_path_factory.mktemp("dmd_step") / "edm")
    return load_denoiser(path), load_denoiser(path).requires_grad_(True), load_denoiser(path)


def _batch(step: int = 0):
    rng = SampleRNG(1, 0, step, range(3))
    g = torch.Generator().manual_seed(step)
    z, labels = rng.randn((1, 8, 8)), random_labels(rng, 10)
    pairs = torch.randn(3, 1, 8, 8, generator=g), torch.rand(3, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 10, (3,), generator=g)
    return z, labels, rng, pairs


@pytest.mark.parametrize("weight, with_pairs, batch", [(0.25, True, 6), (0.0, True, 3), (0.25, False, 3)])
def test_generator_runs_on_regression_batch_only_when_it_counts(tiny, weight, with_pairs, batch):
    real, gen, fake = tiny
    counting = Counting(gen)
    z, labels, rng, pairs = _batch()
    loss_g, terms, x = GeneratorLoss(DMDSettings(regression_weight=weight), pseudo_huber_loss)(
        counting, real, fake, z, labels, rng, *(pairs if with_pairs else ())
    )
    assert counting.batches == [batch]
    assert x.shape == z.shape and not x.requires_grad
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in terms.values())
    if batch == 3:
        assert terms["loss_reg"].item() == 0.0 and torch.equal(loss_g, terms["loss_dm"])


def test_generator_loss_is_dm_plus_weighted_regression(tiny):
    real, gen, fake = tiny
    torch.set_num_threads(1)
    z, labels, rng, (z_ref, y_ref, labels_ref) = _batch(step=1)
    settings = DMDSettings(regression_weight=0.7)
    loss_g, terms, x = GeneratorLoss(settings, pseudo_huber_loss)(gen, real, fake, z, labels, rng, z_ref, y_ref, labels_ref)
    # the same pieces, computed one by one with the same draws
    x_alone = OneStep.of(real)(gen, z, labels)
    x_reg = OneStep.of(real)(gen, z_ref, labels_ref)
    _, _, replay, _ = _batch(step=1)  # an rng that has drawn z and labels, as rng had
    loss_dm = DistributionMatchingLoss(settings)(x_alone, labels, real, fake, replay)
    loss_reg = pseudo_huber_loss(x_reg, y_ref)
    torch.testing.assert_close(x, x_alone.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(terms["loss_dm"], loss_dm, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(terms["loss_reg"], loss_reg, rtol=1e-5, atol=1e-7)
    assert loss_g.item() == pytest.approx(terms["loss_dm"].item() + 0.7 * terms["loss_reg"].item(), rel=1e-6)


@pytest.mark.parametrize("dm_weight", [0.0, 0.5])
def test_dm_weight_scales_or_drops_the_dm_term(tiny, dm_weight):
    """dm_weight = 0 is regression only (the DM term is not computed); otherwise it scales loss_DM."""
    real, gen, fake = tiny
    z, labels, rng, pairs = _batch(step=2)
    loss_g, terms, _ = GeneratorLoss(DMDSettings(regression_weight=0.7, dm_weight=dm_weight), pseudo_huber_loss)(gen, real, fake, z, labels, rng, *pairs)
    _, _, rng1, _ = _batch(step=2)
    _, full, _ = GeneratorLoss(DMDSettings(regression_weight=0.7), pseudo_huber_loss)(gen, real, fake, z, labels, rng1, *pairs)
    want_dm = 0.0 if dm_weight == 0 else full["loss_dm"].item()
    assert terms["loss_dm"].item() == pytest.approx(want_dm, rel=1e-6)
    assert loss_g.item() == pytest.approx(dm_weight * want_dm + 0.7 * full["loss_reg"].item(), rel=1e-6)


def test_generator_and_fake_losses_run_unconditional_and_vp(tmp_path, vp_teacher):
    uncond = make_edm_teacher(tmp_path / "uncond", num_classes=0)
    for path in (uncond, vp_teacher):
        real = load_denoiser(path)
        gen, fake = load_denoiser(path).requires_grad_(True), load_denoiser(path).requires_grad_(True)
        rng = SampleRNG(0, 0, 0, range(2))
        z, labels = rng.randn((1, 8, 8)), random_labels(rng, real.num_classes)
        z_ref, y_ref = torch.randn(2, 1, 8, 8), torch.zeros(2, 1, 8, 8)
        labels_ref = None if labels is None else torch.tensor([0, 1])
        loss_g, terms, x = GeneratorLoss(DMDSettings(), pseudo_huber_loss)(gen, real, fake, z, labels, rng, z_ref, y_ref, labels_ref)
        loss_g.backward()
        loss_f = FakeScoreLoss.for_teacher(real)(fake, x, labels, SampleRNG(0, 10, 0, range(2)))
        loss_f.backward()
        assert torch.isfinite(loss_g) and torch.isfinite(loss_f)
        assert all(p.grad is not None for p in gen.unet.conv_in.parameters())


def test_generator_loss_needs_a_regression_loss_when_weighted():
    with pytest.raises(ValueError, match="regression_loss"):
        GeneratorLoss(DMDSettings(regression_weight=0.25))
    GeneratorLoss(DMDSettings(regression_weight=0.0))  # no regression: none needed

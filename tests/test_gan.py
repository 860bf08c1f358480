"""DMD2's GAN term: losses, the head on the bottleneck, the frozen fake score in the generator update, resume."""

from __future__ import annotations

import contextlib
import copy
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import write_config
from dmd_core import load_denoiser
from dmd_core.dmd import AdversarialLoss, GANLogits, SampleRNG, frozen
from dmd_core.errors import InputError
from dmd_core.gan import BottleneckHead, BottleneckTap, discriminator_loss, generator_gan_loss
from stages import chain, distill
from stages.config import load_config


def test_gan_losses_against_their_formulas():
    real, fake = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([-3.0, 0.0, 1.0])
    by_hand = sum(torch.log1p(torch.exp(f)) for f in fake) / 3 + sum(torch.log1p(torch.exp(-r)) for r in real) / 3
    assert float(discriminator_loss(real, fake)) == pytest.approx(float(by_hand), rel=1e-6)
    assert float(generator_gan_loss(fake)) == pytest.approx(float(sum(torch.log1p(torch.exp(-f)) for f in fake) / 3), rel=1e-6)
    # a perfect discriminator's loss is near 0, a blind one's is 2 log 2
    assert float(discriminator_loss(torch.full((4,), 20.0), torch.full((4,), -20.0))) < 1e-8
    assert float(discriminator_loss(torch.zeros(4), torch.zeros(4))) == pytest.approx(2 * 0.6931472, rel=1e-6)


def test_head_reads_the_bottleneck_only(edm_teacher):
    """The logits change with the mid block's weights and not with anything after it (up blocks, output conv)."""
    fake = load_denoiser(edm_teacher).requires_grad_(False)
    after, mid, stopping = copy.deepcopy(fake), copy.deepcopy(fake), copy.deepcopy(fake)
    for p in (*after.unet.up_blocks.parameters(), *after.unet.conv_out.parameters()):
        p.add_(1.0)
    for p in mid.unet.mid_block.parameters():
        p.mul_(1.5)
    taps = {net: BottleneckTap(net.unet) for net in (fake, after, mid)} | {stopping: BottleneckTap(stopping.unet, stop_early=True)}
    up_path_runs = []
    stopping.unet.conv_out.register_forward_pre_hook(lambda module, args: up_path_runs.append(1))
    x, labels = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(6)
    fake(x, 1.0, labels)
    assert tuple(taps[fake].take().shape) == (6, 16, 4, 4)  # the tests' tiny teacher: 16 channels at 4x4 after one downsampling
    with pytest.raises(RuntimeError, match="no forward"):
        taps[fake].take()  # taken once: never a stale bottleneck from an earlier forward
    head, logits = BottleneckHead(16, (4, 4)), GANLogits(fake.param)

    def run(net):
        return logits(net, taps[net], head, x, labels, SampleRNG(0, 3, 0, range(6)))

    base = run(fake)
    assert torch.equal(run(after), base)
    assert float((run(mid) - base).detach().abs().max()) > 1e-4
    assert torch.equal(run(stopping), base) and not up_path_runs  # the same logits without the up path
    assert stopping(x, 1.0, labels).shape == x.shape and up_path_runs == [1]  # other forwards run whole


def test_a_unet_without_a_mid_block_is_refused():
    from diffusers import UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, mid_block_type=None)  # fmt: skip
    with pytest.raises(InputError, match="mid_block_type null.*distill.gan=false"):
        BottleneckTap(unet)


def test_a_transformer_is_refused_by_name():
    from diffusers import DiTTransformer2DModel

    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=1, num_layers=1, sample_size=4, patch_size=2,
                                num_embeds_ada_norm=10, norm_num_groups=1)  # fmt: skip
    with pytest.raises(InputError, match="a DiTTransformer2DModel, a transformer without one. Fix: set distill.gan=false"):
        BottleneckTap(dit)


def test_generator_update_reaches_g_not_the_fake_score(edm_teacher):
    fake = load_denoiser(edm_teacher)
    fake.gan_tap, fake.gan_head = BottleneckTap(fake.unet), BottleneckHead(16, (4, 4))
    fake.requires_grad_(True)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    adversarial = AdversarialLoss(GANLogits(fake.param), fake)
    with pytest.raises(RuntimeError, match="frozen"):
        adversarial(x, torch.arange(4), SampleRNG(0, 3, 0, range(4)))
    with frozen(fake):
        adversarial(x, torch.arange(4), SampleRNG(0, 3, 0, range(4))).backward()
    assert x.grad is not None and float(x.grad.abs().max()) > 0
    assert all(p.grad is None for p in fake.parameters())  # neither the fake score nor the head
    assert all(p.requires_grad for p in fake.parameters())  # and they train again in the fake-score update


GAN = {"gan": True, "fake_updates_per_generator_update": 2, "regression_weight": 0.0, "steps": 4, "checkpoint_every": 2, "keep_checkpoints": 2}


class _PlainAccelerator:
    """The four methods of Accelerate's Accelerator that dmd_core.step calls, for one process without it."""

    def backward(self, loss):
        loss.backward()

    def no_sync(self, net):
        return contextlib.nullcontext()

    def autocast(self):
        return contextlib.nullcontext()

    def clip_grad_norm_(self, params, max_norm):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


def test_the_step_in_dmd_core_needs_no_accelerate(tmp_path, edm_teacher):
    """dmd_core.step's two updates (generator, then the fake score's two with the head's term) driven by a
    plain object give the Trainer's logs and weights under Accelerate, bit for bit."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from dmd_core.step import Sums, fake_score_updates, generator_update

    cfg = load_config(write_config(tmp_path / "c.yaml", edm_teacher, tmp_path / "store", distill=GAN))
    d, runs = cfg.distill, []
    for plain in (False, True):
        AcceleratorState._reset_state()
        tr = distill.Trainer(cfg, chain.plan(cfg, "distill"), Accelerator(cpu=True))
        if plain:
            acc, sums = _PlainAccelerator(), Sums()
            _, draws = tr.prepare(0, read_pairs=False)
            xs, labels, norm_g = generator_update(acc, tr.gen, tr.real, tr.fake, tr.opt_g, tr.gen_loss, draws, None, d.max_grad_norm, sums)
            norm_f = fake_score_updates(acc, tr.fake, tr.opt_f, tr.fake_loss, tr.fake_batches(0, xs, labels), d.fake_updates_per_generator_update,
                                        1, d.max_grad_norm, sums, tr.discriminator, d.gan_weight_discriminator)  # fmt: skip
            logs = {k: float(v) for k, v in {**sums, "grad_norm_g": norm_g, "grad_norm_fake": norm_f}.items()}
        else:
            logs = tr.step(0)
        runs.append((logs, {k: v.clone() for net in (tr.gen, tr.fake) for k, v in net.state_dict().items()}))
    (accelerated, weights_a), (plain, weights_p) = runs
    assert plain.keys() >= {"loss_dm", "loss_gan_g", "loss_gan_d", "d_real", "loss_fake", "grad_norm_g", "grad_norm_fake"}
    assert all(plain[k] == accelerated[k] for k in plain)
    assert all(torch.equal(weights_a[k], weights_p[k]) for k in weights_a)


def test_gan_step_with_gradient_checkpointing_equals_without(tmp_path, edm_teacher):
    """The fake score stays frozen through the generator's backward, where checkpointed blocks are
    recomputed (unfrozen there, the recompute saved other tensors and torch raised CheckpointError)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    logs = []
    for checkpointing in (False, True):
        cfg = load_config(write_config(tmp_path / "c.yaml", edm_teacher, tmp_path / "store", distill={**GAN, "gradient_checkpointing": checkpointing}))
        AcceleratorState._reset_state()
        tr = distill.Trainer(cfg, chain.plan(cfg, "distill"), Accelerator(cpu=True))
        logs.append([tr.step(step) for step in range(2)])
    assert all(b[k] == pytest.approx(a[k], rel=1e-6) for a, b in zip(*logs) for k in a), logs


def test_stopping_at_the_bottleneck_changes_no_number(tmp_path, edm_teacher):
    """Eager runs end the head's passes at the mid block (BottleneckTap.stop_early): the same losses,
    gradient norms and weights, bit for bit, as running the whole forward."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    cfg = load_config(write_config(tmp_path / "c.yaml", edm_teacher, tmp_path / "store", distill=GAN))
    runs = []
    for stop_early in (True, False):
        AcceleratorState._reset_state()
        tr = distill.Trainer(cfg, chain.plan(cfg, "distill"), Accelerator(cpu=True))
        tap = tr.unwrap(tr.fake).gan_tap
        assert tap.stop_early  # the default when not compiled
        tap.stop_early = stop_early
        logs = [tr.step(step) for step in range(2)]
        runs.append((logs, {k: v.clone() for k, v in tr.unwrap(tr.fake).state_dict().items()}))
    (logs_a, weights_a), (logs_b, weights_b) = runs
    assert logs_a == logs_b
    assert weights_a.keys() == weights_b.keys() and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_gan_distill_logs_saves_and_resumes_exactly(tmp_path, edm_teacher):
    cfg = load_config(write_config(tmp_path / "c.yaml", edm_teacher, tmp_path / "store", distill=GAN))
    chain.run(cfg, "generate", progress=False).manifest
    m = chain.run(cfg, "distill", progress=False).manifest
    out = Path(cfg.store) / "distill" / m.key
    rows = pq.read_table(out / "metrics.parquet").to_pylist()
    assert all(r["loss_gan_g"] > 0 and r["loss_gan_d"] > 0 and 0 < r["d_real"] < 1 and 0 < r["d_fake"] < 1 for r in rows)
    # with lambda_reg = 0: loss_G = loss_DM + w_G loss_GAN_G
    assert all(r["loss_g"] == pytest.approx(r["loss_dm"] + 3e-3 * r["loss_gan_g"], rel=1e-5) for r in rows)
    files = ("generator/diffusion_pytorch_model.safetensors", "fake_score/diffusion_pytorch_model.safetensors", "fake_score/gan_head.safetensors")
    want = {f: {k: v.clone() for k, v in load_file(str(out / f)).items()} for f in files}
    # stopped after the step-2 checkpoint: resumes to the same generator, fake score and head
    for name in ("manifest.json", "generator", "fake_score", "checkpoints/step-0000004"):
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    assert chain.run(cfg, "distill", progress=False).manifest.key == m.key
    for f in files:
        got = load_file(str(out / f))
        assert max(float((got[k] - want[f][k]).abs().max()) for k in got) <= 1e-6, f


def test_gan_settings_key_and_refusals(tmp_path, edm_teacher, sd_teacher):
    base = write_config(tmp_path / "c.yaml", edm_teacher, tmp_path / "store", distill={})
    chain.run(load_config(base), "generate", progress=False).manifest
    plain = chain.plan(load_config(base), "distill").key
    assert chain.plan(load_config(base, ["distill.gan_weight_generator=0.5"]), "distill").key == plain  # only with gan on
    on = chain.plan(load_config(base, ["distill.gan=true"]), "distill").key
    assert on != plain != chain.plan(load_config(base, ["distill.gan=true", "distill.gan_weight_generator=0.5"]), "distill").key
    (tmp_path / "p.txt").write_text("the digit 7\n")
    sd = write_config(tmp_path / "s.yaml", sd_teacher, tmp_path / "store", distill={}, solver="pndm", steps=4, num_samples=8, shard_size=8, prompts=str(tmp_path / "p.txt"))
    chain.run(load_config(sd), "generate", progress=False).manifest
    with pytest.raises(InputError, match="needs real images with captions"):
        chain.plan(load_config(sd, ["distill.gan=true"]), "distill")


def write_real_shard(path: Path, images: torch.Tensor, classes=None, prompts=None, fmt: str = "png") -> Path:
    """A WebDataset shard of real images (uint8 PNGs or float .npy), with cls / prompt.txt beside each."""
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for i, img in enumerate(images):
            sample = {"__key__": f"{i:06d}"}
            if fmt == "png":
                buf = io.BytesIO()
                Image.fromarray(img[0].numpy().astype(np.uint8), mode="L").save(buf, format="PNG")
                sample["png"] = buf.getvalue()
            else:
                buf = io.BytesIO()
                np.save(buf, img.numpy().astype(np.float32))
                sample["image.npy"] = buf.getvalue()
            if classes is not None:
                sample["cls"] = str(int(classes[i])).encode()
            if prompts is not None:
                sample["prompt.txt"] = prompts[i].encode()
            sink.write(sample)
    return path


def test_webdataset_real_data_for_a_pixel_teacher(tmp_path, edm_teacher):
    """PNG images with classes: decoded to v / 127.5 - 1 with their classes, keyed by content; bad sets refused."""
    from accelerate import Accelerator

    g = torch.Generator().manual_seed(0)
    pixels, classes = torch.randint(0, 256, (12, 1, 8, 8), generator=g), torch.arange(12) % 10
    real = tmp_path / "real"
    write_real_shard(real / "real-000000.tar", pixels[:8], classes[:8])
    write_real_shard(real / "real-000001.tar", pixels[8:], classes[8:])
    base = write_config(tmp_path / "c.yaml", edm_teacher, tmp_path / "store", distill={"gan": True, "regression_weight": 0.0, "steps": 2})
    cfg = load_config(base, [f"distill.real_data={real}", "distill.real_samples=10"])
    tr = distill.Trainer(cfg, chain.plan(cfg, "distill"), Accelerator(cpu=True))
    assert len(tr.real_images) == 10 and torch.equal(tr.real_labels, classes[:10])  # shard order, first 10
    assert torch.equal(tr.real_images[torch.arange(10)], pixels[:10].float() / 127.5 - 1)
    assert all(bool(torch.isfinite(v)) for v in tr.discriminator(torch.zeros(4, 1, 8, 8), classes[:4], SampleRNG(0, 10, 0, range(4))).values())
    key = chain.plan(cfg, "distill").key
    assert key != chain.plan(load_config(base), "distill").key != chain.plan(load_config(base, [f"distill.real_data={real}"]), "distill").key
    write_real_shard(real / "real-000001.tar", pixels[8:].flip(0), classes[8:])  # content, not the name, is keyed
    assert chain.plan(cfg, "distill").key != key
    bad = {
        "neither a .tar": tmp_path / "nothing",
        "sample '000000': no class": write_real_shard(tmp_path / "nocls.tar", pixels[:2]),
        r"sample '000001': class 11 is outside this teacher's classes 0\.\.9": write_real_shard(tmp_path / "range.tar", pixels[:2], [0, 11]),
        "sample '000000': png is a 4x4 image; the teacher makes 8x8": write_real_shard(tmp_path / "small.tar", pixels[:2, :, :4, :4], [0, 1]),
    }
    for match, path in bad.items():
        with pytest.raises(InputError, match=match):
            bad_cfg = load_config(base, [f"distill.real_data={path}"])
            distill.Trainer(bad_cfg, chain.plan(bad_cfg, "distill"), Accelerator(cpu=True))


def test_an_unconditional_teacher_gets_real_images_without_classes(tmp_path):
    """The digits' and a WebDataset's classes are dropped for an unconditional teacher (its fake score takes none)."""
    from accelerate import Accelerator

    from conftest import make_edm_teacher

    teacher = make_edm_teacher(tmp_path / "uncond", num_classes=0)
    real = write_real_shard(tmp_path / "real.tar", torch.randint(0, 256, (4, 1, 8, 8)), [1, 2, 3, 4])
    for real_data in ("digits", str(real)):
        cfg = load_config(write_config(tmp_path / "c.yaml", teacher, tmp_path / "store", distill={"gan": True, "regression_weight": 0.0, "real_data": real_data}))
        tr = distill.Trainer(cfg, chain.plan(cfg, "distill"), Accelerator(cpu=True))
        assert tr.real_labels is None
        terms = tr.discriminator(torch.zeros(4, 1, 8, 8), None, SampleRNG(0, 10, 0, range(4)))
        assert bool(torch.isfinite(terms["loss_gan_d"]))


def test_webdataset_real_data_for_a_text_teacher(tmp_path, sd_teacher):
    """Captions join the prompt table after the training prompts (the DM term still draws from those only); the
    images enter latent space through the pipeline's VAE; two steps train with finite losses."""
    from accelerate import Accelerator

    from dmd_core.loading import encode_latents

    (tmp_path / "p.txt").write_text("the digit 7\nthe digit 3\n")
    images = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    captions = ["a digit 7", "the digit 3", "a digit 7", "a handwritten 3", "the digit 7", "a 7"]
    real = write_real_shard(tmp_path / "real.tar", images, prompts=captions, fmt="npy")
    sd = write_config(tmp_path / "s.yaml", sd_teacher, tmp_path / "store", distill={"gan": True, "regression_weight": 0.0, "steps": 2},
                      solver="pndm", steps=4, num_samples=8, shard_size=8, prompts=str(tmp_path / "p.txt"))  # fmt: skip
    cfg = load_config(sd, [f"distill.real_data={real}"])
    tr = distill.Trainer(cfg, chain.plan(cfg, "distill"), Accelerator(cpu=True))
    assert tr.label_range == 2 and tr.real.num_classes == 2 + len(captions)  # one row per real sample, after the training prompts
    assert [tr.real.prompts.prompt(int(r)) for r in tr.real_labels] == captions
    assert torch.allclose(tr.real_images[torch.arange(6)], encode_latents(sd_teacher, images), atol=1e-6) and len(tr.real_images) == 6
    m = chain.run(cfg, "distill", progress=False).manifest
    rows = pq.read_table(Path(cfg.store) / "distill" / m.key / "metrics.parquet").to_pylist()
    assert all(r["loss_gan_d"] > 0 and torch.isfinite(torch.tensor(r["loss_g"])) for r in rows)


def test_discriminator_sees_real_digits_with_their_classes(tmp_path, edm_teacher):
    """The head's loss (dmd_core.step.DiscriminatorLoss): the real half is the embedded digits at indices the
    step's RNG draws, with their own classes (a wrong label changes the loss); the generated half is x; same
    RNG, same loss."""
    from accelerate import Accelerator

    from dmd_core.digits import load_digits_data

    cfg = load_config(write_config(tmp_path / "c.yaml", edm_teacher, tmp_path / "store", distill={"gan": True, "regression_weight": 0.0}))
    tr = distill.Trainer(cfg, chain.plan(cfg, "distill"), Accelerator(cpu=True))
    x, labels = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.arange(8) % 10
    rng = lambda: SampleRNG(0, 10, 3, range(8))  # noqa: E731
    with torch.no_grad():
        terms = tr.discriminator(x, labels, rng())
        images, classes = load_digits_data()
        r = rng()
        idx = r.randint(0, len(images))
        assert len(set(idx.tolist())) > 1
        fake = tr.fake  # on 1 CPU process, Accelerate leaves the module unwrapped
        logit = lambda v, c: tr.gan_logits(fake, fake.gan_tap, fake.gan_head, v, c, r)  # noqa: E731
        real_logits, fake_logits = logit(images[idx], classes[idx]), logit(x, labels)
        by_hand = F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
        assert float(terms["loss_gan_d"]) == pytest.approx(float(by_hand), rel=1e-6)
        assert float(terms["d_real"]) == pytest.approx(float(torch.sigmoid(real_logits).mean()), rel=1e-6)
        assert float(tr.discriminator(x, labels, rng())["loss_gan_d"]) == float(terms["loss_gan_d"])
        r = rng()
        r.randint(0, len(images))
        wrong = logit(images[idx], (classes[idx] + 1) % 10)
        assert float((wrong - real_logits).abs().max()) > 1e-4


def test_no_regression_runs_skip_generate_and_read_no_pairs(tmp_path, edm_teacher, monkeypatch):
    """regression_weight = 0: the pairs are not needed, so generate is not in the chain and no shard is opened."""
    import dmd_core.shards

    def no_pairs(*a, **k):
        raise AssertionError("a pair shard was opened")

    monkeypatch.setattr(dmd_core.shards, "pair_stream", no_pairs)
    monkeypatch.setattr(distill.trainer, "pair_stream", no_pairs)
    cfg = load_config(write_config(tmp_path / "c.yaml", edm_teacher, tmp_path / "store", distill={"regression_weight": 0.0, "steps": 2}))
    assert [s.name for s in chain.stages_for(cfg, "evaluate")] == ["distill", "evaluate"]
    m = chain.run(cfg, "distill", progress=False).manifest
    assert not (tmp_path / "store" / "generate").exists() and "pairs" not in m.upstream
    assert all(r["loss_reg"] == 0 for r in pq.read_table(Path(cfg.store) / "distill" / m.key / "metrics.parquet").to_pylist())
    with_reg = load_config(write_config(tmp_path / "r.yaml", edm_teacher, tmp_path / "store", distill={}))
    assert [s.name for s in chain.stages_for(with_reg, "evaluate")] == ["generate", "distill", "evaluate"]
    with pytest.raises(InputError, match="both 0"):
        chain.plan(load_config(write_config(tmp_path / "z.yaml", edm_teacher, tmp_path / "store", distill={"regression_weight": 0.0, "dm_weight": 0.0})), "distill")


@pytest.mark.slow  # two processes under accelerate launch (gloo on CPU)
def test_two_processes_take_the_same_first_step_with_gan(tmp_path, edm_teacher):
    """DDP with the GAN term: 2 processes x batch B = 1 process x 2B (generator, fake score and head)."""
    from conftest import first_step_one_and_two_processes

    cfg = write_config(tmp_path / "c.yaml", edm_teacher, tmp_path / "store", distill={"gan": True, "fake_updates_per_generator_update": 2})
    chain.run(load_config(cfg), "generate", progress=False).manifest
    one, two = first_step_one_and_two_processes(cfg, tmp_path)
    a, b = load_file(one), load_file(two)
    assert any(k.startswith("head.") for k in a) and a.keys() == b.keys()
    assert max(float((a[k].double() - b[k].double()).abs().max()) for k in a) <= 1e-5

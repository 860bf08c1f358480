"""LoRA of the generator and the fake score (distill.*_lora_rank) and the LoRA exports: the teacher at step 0, only
the adapters train and are checkpointed, exact resume, the cache key, plain-library loads that reproduce the
generator (diffusers' load_lora_weights on the teacher's pipeline, peft's PeftModel on a bare UNet2DModel), and the
refusals of bad settings."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file

from bad_input.refusal import assert_refused
from conftest import add_tiny_evaluate, text_to_image_chain, write_config
from dmd_core.errors import InputError
from dmd_core.lora import DEFAULT_TARGETS, LoraSettings, add_lora, fuse, is_lora_key, save_adapter, save_pipeline_lora, target_modules
from stages import chain
from stages.config import load_config

LORA = ["distill.generator_lora_rank=4", "distill.fake_lora_rank=2", "distill.lora_alpha=8", "distill.lora_dropout=0.1"]
# the generator's learning rate raised: after 4 steps its adapter moves it well away from the teacher, so that
# reproducing it (rather than the teacher) is what the parity checks measure
FAST_G = ["distill.generator_optimizer.lr=0.01", "distill.ema_decay=0.9"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, edm_teacher):
    """generate -> distill (4 steps, checkpoints at 2 and 4, EMA, quality probe) with both adapters."""
    tmp = tmp_path_factory.mktemp("lora")
    cfg = add_tiny_evaluate(write_config(tmp / "c.yaml", edm_teacher, tmp / "store", distill={"eval_every": 2, "eval_samples": 100}))
    c = load_config(cfg, [*LORA, *FAST_G])
    m = chain.run(c, "distill", progress=False).manifest
    return tmp, cfg, c, Path(c.store) / "distill" / m.key, m


def unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_step_zero_is_the_teacher_and_only_adapters_train(lora_run, edm_teacher):
    tmp, cfg, c, out, m = lora_run
    rows = pq.read_table(out / "metrics.parquet").to_pylist()
    # B = 0 in both adapters: at step 0 the fake score is the teacher, so loss_DM is exactly 0 as without LoRA
    assert rows[0]["loss_dm"] == 0.0 and all(r["loss_dm"] > 0 for r in rows[1:])
    teacher = unet_weights(edm_teacher)
    adapted = set(target_modules(UNet2DModel.from_pretrained(str(edm_teacher)), None))
    for net in ("generator", "fake_score", "generator_ema", "generator_best"):
        fused = unet_weights(out / net)
        assert fused.keys() == teacher.keys()
        # weights outside the adapted modules (norms, embeddings, conv_in / conv_out) are the teacher's, bit for bit
        untouched = [k for k in teacher if k.rsplit(".", 1)[0] not in adapted]
        assert untouched and all(torch.equal(fused[k], teacher[k]) for k in untouched), net
        changed = [k for k in teacher if k.rsplit(".", 1)[0] in adapted and k.endswith("weight") and not torch.equal(fused[k], teacher[k])]
        assert changed, net
    # the fused generator/ is the teacher with generator/lora/ (peft's format) on top
    from peft import PeftModel

    merged = PeftModel.from_pretrained(UNet2DModel.from_pretrained(str(edm_teacher)), str(out / "generator" / "lora")).merge_and_unload()
    assert max((merged.state_dict()[k] - v).abs().max().item() for k, v in unet_weights(out / "generator").items()) <= 1e-6
    # checkpoints hold the adapters (and the optimizer state over them), not the networks
    ckpt = out / "checkpoints" / "step-0000004"
    for i, (name, rank) in enumerate((("generator", 4), ("fake_score", 2))):
        state = load_file(str(ckpt / "accelerate" / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")))
        assert state and all(is_lora_key(k) for k in state), name
        assert {v.shape[0] for k, v in state.items() if ".lora_A." in k} == {rank}
        moments = torch.load(ckpt / "accelerate" / ("optimizer.bin" if i == 0 else f"optimizer_{i}.bin"), weights_only=True)["state"]
        assert len(moments) == len(state), name  # AdamW holds moments for the adapter's tensors only
        assert not (ckpt / name / "diffusion_pytorch_model.safetensors").exists() and (ckpt / name / "lora" / "adapter_model.safetensors").is_file()
    info = m.info["lora"]
    assert info["generator"]["rank"] == 4 and info["fake_score"]["rank"] == 2 and info["generator"]["alpha"] == 8
    assert 0 < info["generator"]["adapter_parameters"] < info["generator"]["network_parameters"]


def test_resume_from_a_checkpoint_is_exact(lora_run):
    """Steps 3-4 resumed from the step-2 checkpoint of a 2-step run equal the uninterrupted run's, bit for bit
    (adapters, optimizer moments, EMA and best-so-far restored, the frozen weights from the teacher, LoRA dropout's
    masks drawn from (seed, step); the 2-step run ran in this process after others, so this also shows its masks do
    not depend on what the process drew before)."""
    tmp, cfg, c, out, m = lora_run
    short = load_config(cfg, [*LORA, *FAST_G, "distill.steps=2", f"store={tmp / 'short'}", f"distill.pairs={chain.plan(c, 'generate').out_dir}"])
    first = Path(short.store) / "distill" / chain.run(short, "distill", progress=False).manifest.key
    resumed = load_config(cfg, [*LORA, *FAST_G, f"distill.resume_from={first / 'checkpoints' / 'step-0000002'}"])
    again = Path(resumed.store) / "distill" / chain.run(resumed, "distill", progress=False).manifest.key
    for net in ("generator", "fake_score", "generator_ema", "generator_best"):
        assert same(unet_weights(again / net), unet_weights(out / net)), net
        assert (again / net / "lora" / "adapter_model.safetensors").read_bytes() == (out / net / "lora" / "adapter_model.safetensors").read_bytes(), net
    keys = ("loss_dm", "loss_reg", "loss_fake", "grad_norm_g", "grad_norm_fake")
    a, b = (pq.read_table(d / "metrics.parquet").to_pylist() for d in (out, again))
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]


def test_cache_key_only_when_set(lora_run):
    tmp, cfg, c, out, m = lora_run
    key = lambda *sets: chain.plan(load_config(cfg, list(sets)), "distill").key  # noqa: E731
    base = key()
    # unset is the key of a run without the feature: explicit nulls and the default dropout change nothing
    assert key("distill.generator_lora_rank=null", "distill.fake_lora_rank=null", "distill.lora_dropout=0") == base
    lora = key("distill.generator_lora_rank=4")
    others = {key("distill.fake_lora_rank=4"), key("distill.generator_lora_rank=8"), key("distill.generator_lora_rank=4", "distill.lora_alpha=8"),
              key("distill.generator_lora_rank=4", "distill.lora_target_modules=[to_q]")}  # fmt: skip
    assert len({base, lora, *others}) == 6


def test_default_targets_and_lora_exports_of_a_diffusers_pipeline(sd_teacher, tmp_path):
    """An adapter with random B on the tiny SD UNet (default targets: attention, projections, feed-forward, ResNet
    convs; alpha != rank; dropout in training): its diffusers-format export loaded by the teacher's own
    StableDiffusionPipeline with load_lora_weights equals the fused network (in-process, plain diffusers)."""
    from diffusers import StableDiffusionPipeline

    unet = StableDiffusionPipeline.from_pretrained(str(sd_teacher)).unet
    names = add_lora(unet, LoraSettings(rank=4, alpha=2.0, dropout=0.1), seed=0)
    kinds = {n.rsplit(".", 1)[-1] for n in names} | {".".join(n.split(".")[-2:]) for n in names}
    assert {"to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2", "time_emb_proj", "net.2"} <= kinds
    assert not {"conv_in", "conv_out", "linear_1"} & {n.rsplit(".", 1)[-1] for n in names}  # stem, head and embeddings stay
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.1)
    unet.eval()
    save_pipeline_lora(StableDiffusionPipeline, "unet", save_adapter(unet, tmp_path / "peft"), tmp_path / "lora")
    x, t, text = torch.randn(2, 4, 4, 4), torch.tensor([10, 700]), torch.randn(2, 8, 16)
    with torch.no_grad():
        want = fuse(copy.deepcopy(unet))(x, t, text).sample
        pipe = StableDiffusionPipeline.from_pretrained(str(sd_teacher))
        teacher = pipe.unet(x, t, text).sample
        pipe.load_lora_weights(str(tmp_path / "lora"))
        got = pipe.unet(x, t, text).sample
    assert relative(got, want) <= 1e-5 and relative(teacher, want) > 1e-2


@pytest.mark.slow  # fresh-process checks of both exports; make test covers the loads in process (above) and the bare export (below)
def test_tiny_sd_chain_with_lora(sd_teacher, tmp_path):
    """generate -> distill with both adapters -> evaluate -> export on the tiny SD layout: lora/ loads into the
    teacher's pipeline with load_lora_weights and reproduces the generator in a fresh process."""
    c, m = text_to_image_chain(tmp_path, sd_teacher, ["a 7", "the digit 3"], "pndm", {"regression_loss": "l2", "generator_optimizer": {"lr": 0.01}}, LORA)
    out = Path(c.store) / "export" / m.key
    lora = m.info["lora"]
    assert lora["format"] == "diffusers" and lora["rank"] == 4 and lora["plain_diffusers_parity"]["max_rel_diff"] <= 1e-5
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file() and "load_lora_weights" in (out / "README.md").read_text()


def test_export_of_a_bare_unet_reproduces_the_generator(lora_run, edm_teacher):
    """A UNet2DModel teacher (no diffusers LoRA loader): lora/ in peft's format; the export's own fresh-process check
    and, here, PeftModel on the teacher's UNet reproduce the evaluated generator and differ from the teacher."""
    from peft import PeftModel

    tmp, cfg, c, out, m = lora_run
    e = chain.run(load_config(cfg, [*LORA, *FAST_G, "export.onnx=false", "export.parity_samples=4"]), "export", progress=False).manifest
    export = Path(c.store) / "export" / e.key
    info = e.info["lora"]
    assert info["format"] == "peft" and info["modules"] == m.info["lora"]["generator"]["modules"]
    assert info["plain_diffusers_parity"]["max_rel_diff"] <= 1e-5
    generator = UNet2DModel.from_pretrained(str(export / "generator")).eval()
    net = PeftModel.from_pretrained(UNet2DModel.from_pretrained(str(edm_teacher)), str(export / "lora")).get_base_model().eval()
    x, t, labels = torch.randn(4, 1, 8, 8), torch.full((4,), 0.5), torch.arange(4)
    with torch.no_grad():
        want, got = generator(x, t, labels).sample, net(x, t, labels).sample
        teacher = UNet2DModel.from_pretrained(str(edm_teacher))(x, t, labels).sample
    assert relative(got, want) <= 1e-5 and relative(teacher, want) > 1e-2
    card = (export / "README.md").read_text()
    assert "## LoRA" in card and "PeftModel.from_pretrained" in card


@pytest.mark.parametrize(
    ("sets", "needles"),
    [
        (["distill.generator_lora_rank=0"], ("distill.generator_lora_rank", "greater than 0")),
        (["distill.fake_lora_rank=-4"], ("distill.fake_lora_rank", "greater than 0")),
        (["distill.lora_alpha=8"], ("distill.lora_alpha", "no LoRA rank")),
        (["distill.generator_lora_rank=4", "distill.lora_target_modules=[to_q, nonesuch]"], ("nonesuch", "matches no Linear or Conv module", "conv1")),
        (["distill.generator_lora_rank=4", "distill.lora_target_modules=['to_(q']"], ("to_(q", "not a regular expression")),
    ],
    ids=["rank-zero", "rank-negative", "alpha-without-rank", "pattern-matches-nothing", "pattern-not-a-regex"],
)
def test_bad_settings_are_one_error_line(lora_run, sets, needles):
    tmp, cfg, c, out, m = lora_run
    args = ["distill", "--config", str(cfg)] + [a for s in sets for a in ("--set", s)]
    assert_refused(args, Path(c.store), *needles)


def test_a_network_the_defaults_do_not_match_names_its_modules():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(InputError) as e:
        target_modules(net, None)
    assert "Fix: set distill.lora_target_modules" in str(e.value) and "\n" not in str(e.value)
    assert target_modules(net, ["0"]) == ["0"] and set(DEFAULT_TARGETS) >= {"to_q", "conv1"}

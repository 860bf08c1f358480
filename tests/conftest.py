"""Shared fixtures: tiny models built inside the tests (no downloads), small configs."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DDPMScheduler, UNet2DModel

from dmd_core.denoisers import EDMDenoiser, Parametrization, VPDenoiser
from dmd_core.loading import save_denoiser

ROOT = Path(__file__).resolve().parents[1]

# Each test process, and every process it starts, gets a Prefect home (database, settings) of its own: the
# tests never write to the user's ~/.prefect, and the processes of a parallel run never share a database.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="dmd-tests-prefect-home-")
atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)


def tiny_unet(num_class_embeds: int | None = 11, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        num_class_embeds=num_class_embeds,
    )


def make_edm_teacher(path: Path, num_classes: int = 10, seed: int = 0) -> Path:
    param = Parametrization(kind="edm", num_classes=num_classes, null_class=num_classes if num_classes else None, image_shape=(1, 8, 8))
    unet = tiny_unet(num_classes + 1 if num_classes else None, seed)
    return save_denoiser(EDMDenoiser(unet, param), path)


def make_vp_teacher(path: Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type)
    param = Parametrization(kind="vp", num_classes=10, null_class=10, prediction_type=prediction_type, image_shape=(1, 8, 8))
    den = VPDenoiser(tiny_unet(11, seed), param, sched.alphas_cumprod, dict(sched.config))
    return save_denoiser(den, path)


@pytest.fixture(scope="session")
def edm_teacher(tmp_path_factory) -> Path:
    return make_edm_teacher(tmp_path_factory.mktemp("teacher") / "edm")


@pytest.fixture(scope="session")
def vp_teacher(tmp_path_factory) -> Path:
    return make_vp_teacher(tmp_path_factory.mktemp("teacher") / "vp")


SD_WORDS = ["a", "handwritten", "the", "digit", "seven", "three", "7", "3"]


def make_sd_teacher(path: Path, seed: int = 0, latent_size: int = 4) -> Path:
    """A tiny Stable-Diffusion-layout pipeline (random weights): 1x8x8 images, 4x4x4 latents, SD's schedule
    (``latent_size`` s: 1 x 2s x 2s images, 4 x s x s latents)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dmd_core.text import write_clip_tokenizer

    tokenizer = write_clip_tokenizer(path.parent / f"{path.name}-tokenizer", SD_WORDS, max_length=8)
    torch.manual_seed(seed)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))  # fmt: skip
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=4,
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), latent_channels=4,
        norm_num_groups=4, sample_size=2 * latent_size,
    )  # fmt: skip
    # Stable Diffusion v1.x's scheduler config
    sched = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(str(path))
    return path


def make_tiny_clip(path: Path, seed: int = 3) -> Path:
    """A tiny CLIPModel + CLIPProcessor directory (random weights, 16x16 images) for the CLIP score.

    Seed 3: its image-text cosines on the tests' inputs are positive, so the score is not clamped to 0.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from dmd_core.text import write_clip_tokenizer

    tokenizer = write_clip_tokenizer(path, SD_WORDS, max_length=8)
    torch.manual_seed(seed)
    text = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)  # fmt: skip
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(str(path))
    images = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def sd_teacher(tmp_path_factory) -> Path:
    return make_sd_teacher(tmp_path_factory.mktemp("teacher") / "sd")


TINY_DISTILL = {
    "steps": 4,
    "batch_size": 4,
    "regression_loss": "pseudo_huber",
    "generator_optimizer": {"lr": 1e-4},
    "fake_optimizer": {"lr": 1e-4},
    "checkpoint_every": 2,
    "sample_every": 2,
    "log_every": 1,
    "shuffle_buffer": 16,
    "num_threads": 1,
}


def write_config(path: Path, teacher: Path, store: Path, distill: dict | None = None, **generate) -> Path:
    g = {"num_samples": 40, "steps": 3, "solver": "heun", "shard_size": 16, "batch_size": 8, "seed": 7, "num_threads": 1}
    g.update(generate)
    cfg = {"store": str(store), "teacher": {"path": str(teacher)}, "generate": g}
    if distill is not None:
        cfg["distill"] = {**TINY_DISTILL, **distill}
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(*args: str, check: bool = True, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m stages <args>`` in a subprocess, as a user would run ``dmd``."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "stages", *args], capture_output=True, text=True, cwd=ROOT, env=full_env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"dmd {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def kill_when(args: list[str], root: Path, pattern: str, timeout: float = 300) -> None:
    """Start ``python -m stages <args>``, SIGKILL it as soon as ``root.glob(pattern)`` finds a file (``timeout``: a
    bound for a file that never comes, far above a loaded machine's wait)."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "stages", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while time.time() < deadline and not list(root.glob(pattern)):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def processes_mentioning(text: str) -> list:
    """Live processes whose command line mentions ``text`` (e.g. a test's store path)."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.info["status"] != psutil.STATUS_ZOMBIE and any(text in a for a in p.info["cmdline"] or []):
            found.append(p)
    return found


def wait_for_processes(text: str, module: str, count: int, timeout: float = 300) -> list:
    """Wait until ``count`` live processes mention ``text`` and run ``-m module``; return all mentioning ``text``
    (``timeout``: a bound for processes that never come, far above a loaded machine's start-up)."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        procs = processes_mentioning(text)
        if sum(module in p.info["cmdline"] for p in procs) >= count:
            return procs
        time.sleep(0.2)
    raise AssertionError(f"{count} processes running -m {module} never appeared")


def still_alive(procs: list, timeout: float = 30) -> list:
    """Those of ``procs`` still running (not zombies) after waiting up to ``timeout`` for them to end."""
    import time

    import psutil

    def alive(p) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.time() + timeout
    while time.time() < deadline and any(alive(p) for p in procs):
        time.sleep(0.2)
    return [p for p in procs if alive(p)]


def add_tiny_evaluate(cfg: Path, batch_size: int = 25) -> Path:
    """Append a small FD-digits evaluate section (100 samples, the committed digits classifier)."""
    cfg.write_text(cfg.read_text() + (
        f"evaluate:\n  num_samples: 100\n  batch_size: {batch_size}\n  features: digits\n"
        f"  classifier: {ROOT / 'data' / 'classifier'}\n  speed_batch_size: 8\n  speed_repeats: 1\n  num_threads: 1\n"
    ))  # fmt: skip
    return cfg


def first_step(cfg: Path, out: Path, processes: int = 1, sets: tuple[str, ...] = (), global_batch: int = 8) -> str:
    """tests/distill_first_step.py on 1 process, or under accelerate launch on ``processes``, with ``sets``: its output file."""
    from stages.launch import free_port

    script, env = str(ROOT / "tests" / "distill_first_step.py"), {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())] if processes > 1 else [sys.executable]  # fmt: skip
    subprocess.run([*launch, script, str(cfg), str(global_batch), str(out), *sets], check=True, cwd=ROOT, env=env)
    return str(out)


def first_step_one_and_two_processes(cfg: Path, tmp: Path, global_batch: int = 8) -> tuple[str, str]:
    """tests/distill_first_step.py on 1 process and under accelerate launch on 2: the two output files."""
    return first_step(cfg, tmp / "one.safetensors", 1, (), global_batch), first_step(cfg, tmp / "two.safetensors", 2, (), global_batch)


# ---------------------------------------------------------------- text-to-image teachers (SD, SDXL, SD3, Flux)


def tiny_vae(**codec):
    """The tests' AutoencoderKL (random weights): 1-channel 8 x 8 images, 4 latent channels, a factor 2;
    ``codec``: the family's scaling_factor (and shift_factor)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), latent_channels=4,
        norm_num_groups=4, sample_size=8, **codec,
    )  # fmt: skip


def diffusers_pipeline(folder: Path, **components):
    """The pipeline saved in ``folder``, loaded by diffusers itself (the class its model_index.json names;
    ``components`` replace saved ones), progress bars off: the tests' oracle."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder), **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def read_prompt_pairs(out: Path) -> list[dict]:
    """A generate output's pairs in order: {"noise", "image", "index" (the prompt's)} each."""
    import io

    import numpy as np
    import webdataset as wds

    samples = []
    for shard in sorted(out.glob("pairs-*.tar")):
        for s in wds.WebDataset(str(shard), shardshuffle=False):
            samples.append({"noise": np.load(io.BytesIO(s["noise.npy"])), "image": np.load(io.BytesIO(s["image.npy"])), "index": int(s["cls.txt"])})
    return samples


def generate_prompt_pairs(tmp: Path, teacher: Path, prompts: list[str], overrides: list[str] = (), **generate) -> tuple:
    """The generate stage on ``teacher`` with ``prompts`` (pair i: prompt i mod N) and ``generate`` settings:
    (config, manifest, its pairs in order, ``read_prompt_pairs``)."""
    from stages import chain
    from stages.config import load_config

    (tmp / "prompts.txt").write_text("\n".join(prompts) + "\n")
    c = load_config(write_config(tmp / "c.yaml", teacher, tmp / "store", prompts=str(tmp / "prompts.txt"), **generate), list(overrides))
    m = chain.run(c, "generate", progress=False).manifest
    return c, m, read_prompt_pairs(Path(c.store) / "generate" / m.key)


EVAL_PROMPTS = {"prompt": ["the digit 3", "seven", "a handwritten 7"], "digit": [3, 7, 7]}


def text_to_image_chain(tmp: Path, teacher: Path, prompts: list[str], solver: str, distill: dict, overrides: list[str] = (), parity: int = 4) -> tuple:
    """generate -> distill -> evaluate -> export (what `dmd run` walks) on a tiny text-to-image teacher: ``prompts``
    to train on, EVAL_PROMPTS (labelled by digit) to evaluate on; (config, the export's manifest)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stages import chain
    from stages.config import load_config

    (tmp / "train.txt").write_text("\n".join(prompts) + "\n")
    pq.write_table(pa.table(EVAL_PROMPTS), tmp / "eval.parquet")
    cfg = write_config(tmp / "c.yaml", teacher, tmp / "store", distill={"steps": 2, **distill}, solver=solver, steps=4, num_samples=8,
                       shard_size=8, prompts=str(tmp / "train.txt"))  # fmt: skip
    evaluate = [f"evaluate.prompts={tmp / 'eval.parquet'}", "evaluate.prompt_labels=digit", "evaluate.num_samples=80", "evaluate.batch_size=40",
                "evaluate.features=digits", f"evaluate.classifier={ROOT / 'data' / 'classifier'}", "evaluate.speed_batch_size=4",
                "evaluate.speed_repeats=1", f"export.parity_samples={parity}"]  # fmt: skip
    c = load_config(cfg, [*evaluate, *overrides])
    return c, chain.run(c, "export", progress=False).manifest


def export_of_chain(c, m, layout: str, teacher_nfe: int) -> tuple[Path, dict]:
    """Checks of a ``text_to_image_chain`` run's export manifest ``m``: one-step student metrics, the diffusers
    pipeline class ``layout``, plain-diffusers parity within 1e-5; (the export directory, the distilled generator's
    denoiser.json)."""
    import json

    r = m.info["metrics"]
    assert r["teacher_nfe"] == teacher_nfe and r["student_nfe"] == 1 and r["student_fd"] > 0 and 0.0 <= r["student_class_accuracy"] <= 1.0
    assert m.info["layout"] == layout and m.info["plain_diffusers_parity"]["max_rel_diff"] <= 1e-5
    out = Path(c.store) / "export" / m.key
    assert f"{layout}.from_pretrained" in (out / "README.md").read_text()
    return out, json.loads(next((Path(c.store) / "distill").glob("*/generator/denoiser.json")).read_text())


# ---------------------------------------------------------------- suite summaries

SUITES = {"faults": "tests/faults/", "bad input": "tests/bad_input/"}
_SUITE_RESULTS: dict[str, list[bool]] = {name: [] for name in SUITES}


def pytest_runtest_logreport(report) -> None:
    """Count each case of the two reliability suites once (its call phase, or a failed setup)."""
    if report.when == "call" or (report.when == "setup" and report.failed):
        for name, prefix in SUITES.items():
            if report.nodeid.startswith(prefix) and not report.skipped:
                _SUITE_RESULTS[name].append(report.passed)


def pytest_terminal_summary(terminalreporter) -> None:
    for name, results in _SUITE_RESULTS.items():
        if results:
            terminalreporter.write_line(f"{name}: {len(results)} tried, {sum(results)} held")

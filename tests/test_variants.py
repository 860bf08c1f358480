"""Teacher folders of variant weights (``save_pretrained(..., variant="fp16")``: ``*.fp16.safetensors``): detected,
loaded upcast to float32, sampled as diffusers samples them, keyed apart from the plain weights beside them."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from diffusers import DDPMPipeline, DDPMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DModel
from safetensors.torch import load_file

from conftest import make_edm_teacher, make_sd_teacher, tiny_unet, write_config
from dmd_core.errors import InputError
from dmd_core.layouts import DDPMPipelineLayout, DenoiserDirLayout, StableDiffusionLayout, detect
from dmd_core.loading import PARAM_FILE
from stages import chain
from stages.config import load_config
from stages.registry import module

W, TW = "diffusion_pytorch_model.safetensors", "model.safetensors"
W16, TW16 = "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors"
PROMPTS = ["the digit 7", "a handwritten seven", "3"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Plain, fp16-only and both-kinds folders of the three layouts (what save_pretrained writes, plain and fp16)."""
    tmp = tmp_path_factory.mktemp("variants")
    sd = make_sd_teacher(tmp / "sd")
    StableDiffusionPipeline.from_pretrained(str(sd), dtype=torch.float16).save_pretrained(str(tmp / "sd16"), variant="fp16")
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    DDPMPipeline(unet=tiny_unet(11), scheduler=sched).save_pretrained(str(tmp / "ddpm"))
    DDPMPipeline(unet=tiny_unet(11).half(), scheduler=sched).save_pretrained(str(tmp / "ddpm16"), variant="fp16")
    edm = make_edm_teacher(tmp / "edm")
    shutil.copytree(edm, tmp / "edm16", ignore=shutil.ignore_patterns(W))
    UNet2DModel.from_pretrained(str(edm)).half().save_pretrained(str(tmp / "edm16"), variant="fp16")
    out = {"sd": sd, "sd16": tmp / "sd16", "ddpm": tmp / "ddpm", "ddpm16": tmp / "ddpm16", "edm": edm, "edm16": tmp / "edm16"}
    for name in ("sd", "ddpm", "edm"):  # both kinds: the plain folder with the fp16 files beside
        both = out[f"{name}-both"] = Path(shutil.copytree(out[name], tmp / f"{name}-both"))
        for f in out[f"{name}16"].rglob("*.fp16.safetensors"):
            shutil.copy(f, both / f.relative_to(out[f"{name}16"]))
    return out


PARTS = {"sd": ("unet", "vae", "text_encoder"), "ddpm": ("unet",), "edm": ("",)}
LAYOUTS = {"sd": StableDiffusionLayout, "ddpm": DDPMPipelineLayout, "edm": DenoiserDirLayout}


def loaded_parts(folder: Path, layout) -> dict[str, dict[str, torch.Tensor]]:
    """Each part's tensors as the layout loads them: the UNet, and for SD the VAE and the text encoder."""
    parts = {"unet" if layout.name != "denoiser_dir" else "": layout.load_denoiser(folder).unet.state_dict()}
    if isinstance(layout, StableDiffusionLayout):
        parts["vae"] = layout.load_vae(folder).state_dict()
        parts["text_encoder"] = layout.prompt_encoder(folder).text_encoder.state_dict()
    return parts


def assert_loaded_from(parts: dict[str, dict[str, torch.Tensor]], folder: Path, variant: str | None) -> None:
    """Every loaded tensor is float32 and equals the file's tensor upcast, exactly (persistent buffers included)."""
    for sub, state in parts.items():
        name = (TW if sub == "text_encoder" else W) if variant is None else (TW16 if sub == "text_encoder" else W16)
        saved = load_file(str(folder / sub / name))
        assert saved and set(saved) <= set(state), sub
        for k, v in saved.items():
            assert v.dtype == (torch.float16 if variant else torch.float32) and state[k].dtype == torch.float32, (sub, k)
            assert torch.equal(state[k], v.float()), (sub, k)


@pytest.mark.parametrize("name", ["sd", "ddpm", "edm"])
def test_fp16_only_folder_is_detected_and_loaded_upcast(folders, name):
    folder = folders[f"{name}16"]
    assert not list(folder.rglob(W)) and not list(folder.rglob(TW))  # what save_pretrained(variant="fp16") writes: no plain file
    layout = detect(folder)
    assert type(layout) is LAYOUTS[name] and layout.variant is None
    assert layout.weights_variant(folder) == "fp16" and layout.reading("fp16").weights_variant(folder) == "fp16"
    assert layout.parametrization(folder) == detect(folders[name]).parametrization(folders[name])
    assert_loaded_from(loaded_parts(folder, layout), folder, "fp16")


@pytest.mark.parametrize("name", ["sd", "ddpm", "edm"])
def test_both_kinds_read_what_the_setting_picks(folders, name):
    """Plain by default, the fp16 files with variant fp16; the registered layout stays plain."""
    folder = folders[f"{name}-both"]
    plain, fp16 = detect(folder), detect(folder).reading("fp16")
    assert (plain.weights_variant(folder), fp16.weights_variant(folder), detect(folder).variant) == (None, "fp16", None)
    assert_loaded_from(loaded_parts(folder, plain), folder, None)
    assert_loaded_from(loaded_parts(folder, fp16), folder, "fp16")


def read_pairs(out: Path) -> list[dict]:
    samples = []
    for shard in sorted(out.glob("pairs-*.tar")):
        for s in wds.WebDataset(str(shard), shardshuffle=False):
            samples.append({"noise": np.load(io.BytesIO(s["noise.npy"])), "image": np.load(io.BytesIO(s["image.npy"])), "index": int(s["cls.txt"])})
    return samples


def test_pairs_of_an_fp16_only_folder_equal_diffusers_with_variant_fp16(tmp_path, folders):
    """The stored latents = StableDiffusionPipeline.from_pretrained(dir, variant="fp16").to(float32)(prompt, latents=z,
    2 PLMS steps, output_type="latent"): the stages read the fp16 weights as diffusers does, in float32."""
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    cfg = write_config(tmp_path / "c.yaml", folders["sd16"], tmp_path / "store", solver="pndm", steps=2, num_samples=3, shard_size=3,
                       prompts=str(tmp_path / "prompts.txt"))  # fmt: skip
    out = chain.run(load_config(cfg), "generate", progress=False).out_dir
    pairs = read_pairs(out)
    pipe = StableDiffusionPipeline.from_pretrained(str(folders["sd16"]), variant="fp16").to(torch.float32)
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
    pipe.set_progress_bar_config(disable=True)
    z = torch.from_numpy(np.stack([s["noise"] for s in pairs]))
    with torch.no_grad():
        want = pipe([PROMPTS[s["index"]] for s in pairs], latents=z, num_inference_steps=2, guidance_scale=1.0, output_type="latent").images
    got = torch.from_numpy(np.stack([s["image"] for s in pairs]))
    assert got.shape == want.shape and float((got - want).abs().max()) <= 1e-4


def plan_of(cfg: Path, *overrides: str):
    c = load_config(cfg, list(overrides))
    teacher = chain.resolve_teacher(c)
    return teacher, module("generate").plan(c, teacher)


def test_the_variant_keys_every_output_and_reaches_the_stages(tmp_path, folders):
    """Both kinds in one folder: null and fp16 read different files, so the teacher's digest (in every key) and the
    prompt embeddings' key differ; the plan's digest alone brings the variant back (Plan.teacher, in a worker)."""
    from stages.prompt_rows import embeddings_key
    from stages.store import open_store

    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    cfg = write_config(tmp_path / "c.yaml", folders["sd-both"], tmp_path / "store", solver="pndm", steps=2, prompts=str(tmp_path / "prompts.txt"))
    (plain, p_plain), (fp16, p_fp16) = plan_of(cfg), plan_of(cfg, "teacher.variant=fp16")
    store = open_store(load_config(cfg).store)
    assert fp16.digest == f"{plain.digest}:fp16" and (plain.variant, fp16.variant) == (None, "fp16")
    assert p_plain.key != p_fp16.key and p_fp16.upstream["teacher"] == fp16.digest
    assert embeddings_key(store, plain, "x:prompt", "float32") != embeddings_key(store, fp16, "x:prompt", "float32")
    assert p_fp16.teacher().variant == "fp16" and p_plain.teacher().variant is None
    unet = p_fp16.teacher().load().unet.state_dict()
    assert all(torch.equal(unet[k], v.float()) for k, v in load_file(str(folders["sd-both"] / "unet" / W16)).items())
    # an fp16-only folder reads the same files whatever the setting: the same key
    only = write_config(tmp_path / "o.yaml", folders["sd16"], tmp_path / "store", solver="pndm", steps=2, prompts=str(tmp_path / "prompts.txt"))
    assert plan_of(only)[1].key == plan_of(only, "teacher.variant=fp16")[1].key


def test_a_plain_folder_keeps_its_digest_and_key(tmp_path, folders):
    """No variant read: the teacher's digest is the folder's, as before variants (outputs already in a store stay valid)."""
    from stages.store import open_store

    cfg = write_config(tmp_path / "c.yaml", folders["ddpm"], tmp_path / "store", solver="pndm", steps=2)
    teacher, _ = plan_of(cfg)
    assert teacher.digest == open_store(load_config(cfg).store).digest(folders["ddpm"]) and teacher.variant is None


@pytest.mark.parametrize("folder, needles", [
    ("ddpm", ("teacher.variant is 'fp16'", "unet has no 'fp16' weights", f"unet/: {W}", "Fix: set teacher.variant to null (the plain weights)")),
    ("sd", ("teacher.variant is 'fp16'", f"unet/: {W}; vae/: {W}; text_encoder/: {TW}", "null (the plain weights)")),
])  # fmt: skip
def test_an_absent_variant_is_refused_naming_the_files(tmp_path, folders, folder, needles):
    cfg = write_config(tmp_path / "c.yaml", folders[folder], tmp_path / "store", solver="pndm", steps=2)
    with pytest.raises(InputError) as e:
        chain.resolve_teacher(load_config(cfg, ["teacher.variant=fp16"]))
    line = str(e.value)
    assert "\n" not in line and all(n in line for n in needles), line
    assert not (tmp_path / "store" / "generate").exists()


def test_the_variant_setting_is_bounded(tmp_path, folders):
    cfg = write_config(tmp_path / "c.yaml", folders["ddpm"], tmp_path / "store")
    assert load_config(cfg, ["teacher.variant=bf16"]).teacher.variant == "bf16" and load_config(cfg).teacher.variant is None
    with pytest.raises(InputError, match="teacher.variant"):
        load_config(cfg, ["teacher.variant=fp32"])


def test_load_unet_names_the_variant_it_was_not_asked_for(folders):
    """The library call without a variant, on fp16-only weights: the error names the file and the setting."""
    from dmd_core.loading import load_unet

    with pytest.raises(InputError, match=rf"weights missing: expected .*/{W}, found only .*/{W16}: the 'fp16' variant. Fix: set teacher.variant: fp16"):
        load_unet(folders["edm16"])
    assert torch.equal(load_unet(folders["edm16"], "fp16").conv_in.weight, load_file(str(folders["edm16"] / W16))["conv_in.weight"].float())


def test_ambiguous_and_mixed_folders_are_refused(tmp_path, folders):
    """Two variants and no plain weights: the setting must pick; parts of different kinds: no setting reads them all."""
    two = Path(shutil.copytree(folders["ddpm16"], tmp_path / "two"))
    shutil.copy(two / "unet" / W16, two / "unet" / "diffusion_pytorch_model.bf16.safetensors")
    with pytest.raises(InputError, match=r"holds the bf16 and fp16 variants .* Fix: set teacher.variant to one of them"):
        detect(two).weights_variant(two)
    assert detect(two).reading("bf16").weights_variant(two) == "bf16"
    mixed = Path(shutil.copytree(folders["sd"], tmp_path / "mixed"))
    (mixed / "vae" / W).rename(mixed / "vae" / W16)
    for variant in (None, "fp16"):
        with pytest.raises(InputError, match=rf"vae/: {W16}.*Fix: save every part with one kind of weights"):
            detect(mixed).reading(variant).weights_variant(mixed)


@pytest.mark.slow  # about 40 s (evaluate's reference statistics, export's fresh-process check); the loads it runs are the fast tests'
def test_an_fp16_only_teacher_runs_through_export(tmp_path, folders):
    """distill, evaluate and export read the fp16 weights too: the export's VAE and text encoder are the teacher's
    fp16 weights upcast, and the exported pipeline reproduces the generator in plain diffusers."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from conftest import ROOT

    (tmp_path / "train.txt").write_text("\n".join(PROMPTS) + "\n")
    pq.write_table(pa.table({"prompt": ["the digit 3", "seven"], "digit": [3, 7]}), tmp_path / "eval.parquet")
    cfg = write_config(tmp_path / "c.yaml", folders["sd16"], tmp_path / "store", distill={"steps": 1, "regression_weight": 0.0, "sample_every": 1},
                       solver="pndm", steps=2, num_samples=8, shard_size=8, prompts=str(tmp_path / "train.txt"))  # fmt: skip
    c = load_config(cfg, [f"evaluate.prompts={tmp_path / 'eval.parquet'}", "evaluate.num_samples=80", "evaluate.batch_size=40", "evaluate.features=digits",
                          f"evaluate.classifier={ROOT / 'data' / 'classifier'}", "evaluate.teacher_steps=2", "evaluate.speed_batch_size=2",
                          "evaluate.speed_repeats=1", "export.parity_samples=2"])  # fmt: skip
    m = chain.run(c, "export", progress=False).manifest
    assert m.info["plain_diffusers_parity"]["max_rel_diff"] <= 1e-5
    out = Path(c.store) / "export" / m.key
    assert_loaded_from({"vae": load_file(str(out / "vae" / W)), "text_encoder": load_file(str(out / "text_encoder" / TW))}, folders["sd16"], "fp16")

"""SD3 teachers (StableDiffusion3Pipeline folders): two CLIP encoders with projection and an optional T5, pooled
projections, a flow-matching MMDiT; prompt rows, pairs and exports against diffusers' own StableDiffusion3Pipeline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import SD_WORDS, diffusers_pipeline, export_of_chain, generate_prompt_pairs, text_to_image_chain, tiny_vae, write_config
from dmd_core.errors import InputError
from dmd_core.layouts import StableDiffusion3Layout, detect
from dmd_core.layouts.mmdit import SD3Denoiser
from dmd_core.loading import load_denoiser, load_prompt_encoder, read_parametrization

PROMPTS = ["the digit 7", "a handwritten seven", "3"]
POOLED, JOINT = 8, 40  # each CLIP encoder's projection_dim; T5's d_model = the transformer's joint_attention_dim


def write_t5_tokenizer(out_dir: Path, words: list[str]):
    """A T5 tokenizer (SentencePiece unigram, as T5's) whose pieces are exactly ``"▁" + word``, saved to ``out_dir``:
    no tokenizer can be downloaded. Unknown words become "▁" and <unk>; every prompt ends with </s>."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0 - i) for i, w in enumerate(dict.fromkeys(words))]
    tokenizer = T5Tokenizer(vocab=[*vocab, ("\u2581", -100.0)], extra_ids=0)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def tiny_t5(vocab_size: int, width: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=width, d_kv=8, d_ff=32, num_layers=1, num_heads=2, relative_attention_num_buckets=8))


def make_sd3_teacher(path: Path, seed: int = 0, t5: bool = True, dynamic: bool = False) -> Path:
    """A tiny SD3 pipeline (random weights): two CLIP encoders (16 wide, projected to 8), T5 40 wide (or none: the
    pipeline's zeros), an MMDiT of 2 joint blocks on 4x4x4 latents (patch 1) of 1x8x8 images, SD3's shift 3
    (``dynamic``: SD3.5-style dynamic shifting instead)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from dmd_core.text import write_clip_tokenizer

    tokenizer = write_clip_tokenizer(path.parent / f"{path.name}-tokenizer", SD_WORDS, max_length=8)
    t5_tokenizer = write_t5_tokenizer(path.parent / f"{path.name}-t5-tokenizer", SD_WORDS)
    torch.manual_seed(seed)
    clip = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=POOLED)  # fmt: skip
    text, text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip)), CLIPTextModelWithProjection(CLIPTextConfig(**clip))
    transformer = SD3Transformer2DModel(
        sample_size=4, patch_size=1, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=JOINT, caption_projection_dim=16, pooled_projection_dim=2 * POOLED, pos_embed_max_size=8,
    )  # fmt: skip
    vae = tiny_vae(scaling_factor=1.5305, shift_factor=0.0609)  # SD3's VAE scale and shift
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=dynamic, base_image_seq_len=4, max_image_seq_len=64)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=sched, vae=vae, text_encoder=text, tokenizer=tokenizer, text_encoder_2=text_2, tokenizer_2=tokenizer,
        text_encoder_3=tiny_t5(len(t5_tokenizer), JOINT) if t5 else None, tokenizer_3=t5_tokenizer if t5 else None,
    )  # fmt: skip
    pipe.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def sd3_teacher(tmp_path_factory) -> Path:
    return make_sd3_teacher(tmp_path_factory.mktemp("teacher") / "sd3")


def sd3_pipe(folder: Path):
    """The folder through diffusers; without T5 the pipeline is loaded as diffusers documents it (text_encoder_3=None)."""
    no_t5 = json.loads((folder / "model_index.json").read_text())["text_encoder_3"][0] is None
    return diffusers_pipeline(folder, **(dict(text_encoder_3=None, tokenizer_3=None) if no_t5 else {}))


def edited(teacher: Path, to: Path, rel: str, **changes) -> Path:
    t = shutil.copytree(teacher, to)
    cfg = json.loads((t / rel).read_text())
    (t / rel).write_text(json.dumps({**cfg, **changes}))
    return t


# ---------------------------------------------------------------- the layout


def test_sd3_folder_is_a_flow_text_to_image_teacher(sd3_teacher):
    assert isinstance(detect(sd3_teacher), StableDiffusion3Layout)
    p = read_parametrization(sd3_teacher)
    assert (p.kind, p.text_conditioned, p.image_shape, p.shift, p.use_dynamic_shifting, p.guidance_embeds) == ("flow", True, (4, 4, 4), 3.0, False, False)
    den = load_denoiser(sd3_teacher)
    assert isinstance(den, SD3Denoiser) and not any(q.requires_grad for q in den.parameters())


@pytest.mark.parametrize("t5", [True, False], ids=["t5", "no-t5"])
def test_prompt_rows_equal_the_pipelines_encode_prompt(tmp_path, sd3_teacher, t5):
    """CLIP penultimate states side by side, padded to T5's width, then T5's 256 tokens (zeros without T5); pooled: both
    projections. The unconditional row is the empty prompt's, as the pipeline encodes negative_prompt=""."""
    folder = sd3_teacher if t5 else make_sd3_teacher(tmp_path / "sd3", t5=False)
    rows = load_prompt_encoder(folder).table(PROMPTS).rows(range(4))
    assert rows["hidden"].shape == (4, 8 + 256, JOINT) and rows["pooled"].shape == (4, 2 * POOLED)
    with torch.no_grad():
        hidden, neg, pooled, neg_pooled = sd3_pipe(folder).encode_prompt(PROMPTS, None, None, device="cpu", do_classifier_free_guidance=True)
    assert torch.equal(rows["hidden"][:3], hidden) and torch.equal(rows["pooled"][:3], pooled)
    # encoded alone, the pipeline's in a batch of 3: the same up to the matmul's batch-size rounding
    torch.testing.assert_close(rows["hidden"][3], neg[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(rows["pooled"][3], neg_pooled[0], rtol=0, atol=1e-6)
    assert bool((rows["hidden"][:, 8:] == 0).all()) == (not t5) and bool((rows["hidden"][:, :8, 32:] == 0).all())


def test_layout_checks_widths_parts_and_schedule(tmp_path, sd3_teacher):
    cases = [
        ("transformer/config.json", {"joint_attention_dim": 24}, r"joint_attention_dim 24, narrower than the CLIP encoders' hidden sizes 16 \+ 16 = 32"),
        ("transformer/config.json", {"pooled_projection_dim": 12}, r"pooled_projection_dim 12 but the CLIP encoders' projection_dim are 8 \+ 8 = 16"),
        ("text_encoder_3/config.json", {"d_model": 48}, "d_model 48 but .*joint_attention_dim 40"),
        ("vae/config.json", {"latent_channels": 8}, "latent_channels 8 but .*in_channels 4"),
        ("vae/config.json", {"shift_factor": "x"}, "shift_factor must be a finite number or null"),
        ("transformer/config.json", {"_class_name": "FluxTransformer2DModel"}, "names 'FluxTransformer2DModel'.*SD3Transformer2DModel"),
        ("scheduler/scheduler_config.json", {"_class_name": "DDIMScheduler"}, "names 'DDIMScheduler'.*flow-matching"),
        ("scheduler/scheduler_config.json", {"stochastic_sampling": True}, "stochastic_sampling"),
        ("model_index.json", {"text_encoder_3": [None, None]}, "text_encoder_3 and tokenizer_3 .* come together"),
    ]
    for i, (rel, change, message) in enumerate(cases):
        with pytest.raises(InputError, match=message):
            read_parametrization(edited(sd3_teacher, tmp_path / str(i), rel, **change))
    t = shutil.copytree(sd3_teacher, tmp_path / "no-te2")
    shutil.rmtree(t / "text_encoder_2")
    with pytest.raises(InputError, match="StableDiffusion3Pipeline folder without text_encoder_2/"):
        read_parametrization(t)


def sized_teachers(teacher: Path, store: Path, *sizes: str):
    """The teacher as the chain resolves it (stages.chain.resolve_teacher) with each of ``sizes`` as teacher.image_size
    ("" leaves it unset)."""
    from stages import chain
    from stages.config import load_config

    cfg = write_config(store.parent / "sized.yaml", teacher, store)
    return [chain.resolve_teacher(load_config(cfg, [f"teacher.image_size={size}"] if size else [])) for size in sizes]


def test_image_size_sets_the_latents_and_the_key(tmp_path):
    """teacher.image_size [H, W] (pixels: the pipeline's height and width) distils at C x H/f x W/f latents (f = 2, the
    tiny VAE's factor), the dynamic shift counting their (H/f)(W/f) tokens (patch 1); it joins the teacher's digest, so
    every key holding the teacher tells sizes apart. Unset: the pipeline's default, sample_size 4 x f = 8 pixels."""
    teacher = make_sd3_teacher(tmp_path / "sd3", dynamic=True)
    plain, default, sized = sized_teachers(teacher, tmp_path / "store", "", "[8, 8]", "[12, 16]")
    assert (plain.image_shape, plain.pixel_shape(), plain.param.image_seq_len) == ((4, 4, 4), (1, 8, 8), 16)
    assert (sized.image_shape, sized.pixel_shape(), sized.param.image_seq_len) == ((4, 6, 8), (1, 12, 16), 48)
    assert default.param == plain.param and default.digest == plain.digest + ":image_size=8x8"
    assert sized.digest == plain.digest + ":image_size=12x16" and sized.load().param == sized.param


def test_image_size_is_refused_where_it_does_not_fit(tmp_path, sd3_teacher):
    """Sides that are not multiples of the VAE's factor x the patch (2 here) name the nearest that are; sides past the
    position embeddings (pos_embed_max_size 8 x patch 1 x f 2 = 16 pixels) say the limit; SDXL's size settings and a
    denoiser.json beside model_index.json (the old way to set the size) are refused, each in one line."""
    store = tmp_path / "store"
    for size, message in [("[12, 15]", r"teacher.image_size \[12, 15\]: each side must be a multiple of 2 pixels .*Fix: use the nearest size that fits, "
                                        r"\[12, 14\] or \[12, 16\]\."),
                          ("[12, 20]", r"larger than .*position embeddings cover: at most 16 pixels a side .*Fix: set it to at most \[16, 16\]")]:  # fmt: skip
        with pytest.raises(InputError, match=message):
            sized_teachers(sd3_teacher, store, size)
    from stages import chain
    from stages.config import load_config

    with pytest.raises(InputError, match="teacher.original_size sets SDXL's size conditioning.*sd3_pipeline teacher"):
        chain.resolve_teacher(load_config(write_config(tmp_path / "c.yaml", sd3_teacher, store), ["teacher.original_size=[8, 8]"]))
    t = shutil.copytree(sd3_teacher, tmp_path / "t")
    (t / "denoiser.json").write_text(json.dumps({"image_shape": [4, 6, 8]}))
    with pytest.raises(InputError, match=r"denoiser.json sits beside .*model_index.json.*Fix: remove denoiser.json and set teacher.image_size.*\[8, 8\]"):
        read_parametrization(t)


def test_latent_codec_reads_the_vae_scale_and_shift(sd3_teacher):
    """Decode = vae.decode(z / scaling_factor + shift_factor), as the pipeline does; encode is its inverse on the means."""
    from diffusers import AutoencoderKL

    layout = detect(sd3_teacher)
    vae = AutoencoderKL.from_pretrained(str(sd3_teacher / "vae"))
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(layout.pixel_decoder(sd3_teacher)(z), vae.decode(z / 1.5305 + 0.0609).sample)
        torch.testing.assert_close(layout.encode_pixels(sd3_teacher, x), (vae.encode(x).latent_dist.mean - 0.0609) * 1.5305)


def test_fp16_variant_folder_reads_as_the_plain_one(tmp_path, sd3_teacher):
    """A folder saved with variant="fp16" (transformer, VAE and all three text encoders) loads upcast, the same denoiser
    and prompt rows as the plain folder it was saved from, its variant found with no setting."""
    t = tmp_path / "fp16"
    sd3_pipe(sd3_teacher).save_pretrained(str(t), variant="fp16")
    assert (t / "transformer" / "diffusion_pytorch_model.fp16.safetensors").is_file() and (t / "text_encoder_3" / "model.fp16.safetensors").is_file()
    assert detect(t).weights_variant(t) == "fp16"
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outs = []
        for folder in (sd3_teacher, t):
            den = load_denoiser(folder)
            den.set_prompts(load_prompt_encoder(folder).table(PROMPTS[:2]))
            outs.append(den(x, torch.tensor([0.3, 0.9]), torch.arange(2), 4.0))
    assert torch.equal(*outs)


# ---------------------------------------------------------------- pairs = StableDiffusion3Pipeline


@pytest.mark.parametrize("guidance", [1.0, 7.0], ids=["g1", "cfg7"])
def test_pairs_equal_diffusers_sd3_pipeline(tmp_path, sd3_teacher, guidance):
    """The stored image latent = StableDiffusion3Pipeline(prompt, latents=z, 8 Euler steps (shift 3), guidance g,
    output_type="latent"): the generate stage's flow Euler solver with CFG on the velocity against the empty prompt."""
    import numpy as np

    _, m, pairs = generate_prompt_pairs(tmp_path, sd3_teacher, PROMPTS, solver="euler", steps=8, num_samples=6, shard_size=6, guidance_scale=guidance)
    assert [s["index"] for s in pairs] == [i % 3 for i in range(6)] and m.info["nfe"] == 8
    z = torch.from_numpy(np.stack([s["noise"] for s in pairs]))
    with torch.no_grad():
        want = sd3_pipe(sd3_teacher)([PROMPTS[s["index"]] for s in pairs], latents=z, num_inference_steps=8, guidance_scale=guidance,
                                     output_type="latent").images  # fmt: skip
    got = torch.from_numpy(np.stack([s["image"] for s in pairs]))
    assert got.shape == want.shape and float((got - want).abs().max()) <= 1e-4


def test_pairs_at_an_image_size_equal_the_pipelines_at_that_height_and_width(tmp_path):
    """teacher.image_size [12, 16] with SD3.5's dynamic shift: the pairs = StableDiffusion3Pipeline(prompt, latents=z,
    height=12, width=16, 4 steps), whose shift the pipeline computes from the latents' 48 tokens (the default size's 16
    tokens would give other pairs)."""
    import numpy as np
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    teacher = make_sd3_teacher(tmp_path / "sd3", dynamic=True)
    _, m, pairs = generate_prompt_pairs(tmp_path, teacher, PROMPTS, ["teacher.image_size=[12, 16]"], solver="euler", steps=4, num_samples=3,
                                        shard_size=3, guidance_scale=3.0)  # fmt: skip
    z = torch.from_numpy(np.stack([s["noise"] for s in pairs]))
    assert z.shape == (3, 4, 6, 8)
    with torch.no_grad():
        pipe = sd3_pipe(teacher)
        want = pipe(PROMPTS, latents=z, height=12, width=16, num_inference_steps=4, guidance_scale=3.0, output_type="latent").images
        sched = pipe.scheduler.config
        mu = calculate_shift(16, sched.base_image_seq_len, sched.max_image_seq_len, sched.base_shift, sched.max_shift)
        at_default_shift = pipe(PROMPTS, latents=z, height=12, width=16, num_inference_steps=4, guidance_scale=3.0, output_type="latent", mu=mu).images
    got = torch.from_numpy(np.stack([s["image"] for s in pairs]))
    assert float((got - want).abs().max()) <= 1e-4 and float((got - at_default_shift).abs().max()) > 1e-3


# ---------------------------------------------------------------- the whole chain, and the exports


@pytest.fixture(scope="module")
def sd3_run(tmp_path_factory, sd3_teacher):
    """generate -> distill -> evaluate -> export on the tiny SD3 teacher with two prompt files (what `dmd run` walks)."""
    from conftest import make_tiny_clip

    tmp = tmp_path_factory.mktemp("sd3-run")
    return text_to_image_chain(tmp, sd3_teacher, PROMPTS, "euler", {"guidance_scale": 3.0}, [f"evaluate.clip_model={make_tiny_clip(tmp / 'clip')}"])


def test_chain_runs_end_to_end_on_sd3(sd3_run):
    _, spec = export_of_chain(*sd3_run, "StableDiffusion3Pipeline", teacher_nfe=4)
    assert (spec["kind"], spec["shift"], spec["text_conditioned"]) == ("flow", 3.0, True)  # the generator keeps the teacher's shift


def test_export_is_a_plain_sd3_pipeline(sd3_run):
    """StableDiffusion3Pipeline.from_pretrained(export)(prompts, num_inference_steps=1, guidance_scale=1, latents=z) = G(z, prompt)
    = z - v(z, 1) (export checked it in a fresh process on the held-out prompts: plain_diffusers_parity; here on other prompts)."""
    from dmd_core.dmd import OneStep

    c, m = sd3_run
    out = Path(c.store) / "export" / m.key
    pipe = sd3_pipe(out)
    prompts = ["the digit 3", "seven", "3 seven"]
    z = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = pipe(prompts, latents=z, num_inference_steps=1, guidance_scale=1.0, output_type="latent").images
        gen = load_denoiser(out / "transformer")
        gen.set_prompts(load_prompt_encoder(out).table(prompts))
        want = OneStep.of(gen)(gen, z, torch.arange(3))
    assert isinstance(gen, SD3Denoiser) and OneStep.of(gen).level == 1.0 and pipe.scheduler.timesteps.tolist() == [1000.0]
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    assert m.info["plain_diffusers_parity"]["max_rel_diff"] <= 1e-5 and m.info["plain_diffusers_parity"]["inputs"] == 4


@pytest.mark.slow  # a variant of the one-step chain above (k steps): make test-slow
def test_k_step_export_without_t5(tmp_path):
    """A 4-step generator of an SD3 teacher without T5 (zeros in its place) exports as a StableDiffusion3Pipeline that
    diffusers loads with text_encoder_3=None: torch.manual_seed(9); pipe(prompts, sigmas=[s_0..s_3]) with the unshifted
    stochastic FlowMatchEuler scheduler = MultiStep, the later noise drawn from torch's global generator in diffusers' order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from conftest import ROOT, write_config
    from dmd_core.dmd import MultiStep, noise_levels
    from stages import chain
    from stages.config import load_config

    teacher = make_sd3_teacher(tmp_path / "sd3", t5=False, dynamic=True)
    assert read_parametrization(teacher).image_seq_len == 16  # (4 / patch 1)^2 tokens of the dynamic shift
    (tmp_path / "train.txt").write_text("\n".join(PROMPTS) + "\n")
    pq.write_table(pa.table({"prompt": ["the digit 3", "seven"], "digit": [3, 7]}), tmp_path / "eval.parquet")
    cfg = write_config(tmp_path / "c.yaml", teacher, tmp_path / "store", distill={"steps": 2, "generator_timesteps": [999, 749, 499, 249], "regression_weight": 0.0},
                       solver="euler", steps=4, prompts=str(tmp_path / "train.txt"))  # fmt: skip
    c = load_config(cfg, [f"evaluate.prompts={tmp_path / 'eval.parquet'}", "evaluate.num_samples=80", "evaluate.batch_size=40", "evaluate.features=digits",
                          f"evaluate.classifier={ROOT / 'data' / 'classifier'}", "evaluate.speed_batch_size=2", "evaluate.speed_repeats=1", "export.parity_samples=3"])  # fmt: skip
    m = chain.run(c, "export", progress=False).manifest
    assert m.info["metrics"]["student_nfe"] == 4 and m.info["network_evaluations"] == 4 and m.info["plain_diffusers_parity"]["max_rel_diff"] <= 1e-5
    out = Path(c.store) / "export" / m.key
    gen = load_denoiser(out / "transformer")
    sigmas = [1.0] + [float(s) for s in noise_levels(gen.param, torch.tensor([749, 499, 249]))[1]]
    assert m.info["call_arguments"] == {"height": 8, "width": 8, "sigmas": sigmas} and sigmas == sorted(sigmas, reverse=True)
    card = (out / "README.md").read_text()
    assert f"text_encoder_3=None, tokenizer_3=None)\ntorch.manual_seed({c.evaluate.seed})" in card and f"sigmas={sigmas}, guidance_scale=1.0)" in card
    pipe = sd3_pipe(out)
    prompts = ["the digit 3", "seven", "3 seven"]
    z = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.manual_seed(9)  # the pipeline hands the scheduler's stochastic steps no generator: they draw from the global one
        got = pipe(prompts, latents=z, sigmas=sigmas, guidance_scale=1.0, output_type="latent").images
        gen.set_prompts(load_prompt_encoder(out).table(prompts))
        g = torch.Generator().manual_seed(9)
        want = MultiStep.of(gen)(gen, z, torch.arange(3), lambda j: torch.randn(z.shape, generator=g))
    torch.testing.assert_close(pipe.scheduler.sigmas[:-1].double(), torch.tensor(sigmas, dtype=torch.float64), rtol=1e-6, atol=0)
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())

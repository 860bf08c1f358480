"""Config loading: defaults, overrides, relative paths, content keys."""

from __future__ import annotations

import pytest

from dmd_core.errors import InputError
from stages.config import DEFAULT_CONFIG, PipelineConfig, load_config, parse_override
from stages.registry import spec
from stages.store import content_key


def test_embedded_default_loads_and_resolves_teacher_path():
    cfg = load_config()
    assert cfg.teacher.path == str((DEFAULT_CONFIG.parent / "teacher").resolve())
    assert cfg.generate.solver == "heun" and cfg.generate.steps == 18 and cfg.store == "runs/store"


def test_overrides_are_typed():
    assert parse_override("generate.num_samples=512") == (["generate", "num_samples"], 512)
    assert parse_override("generate.guidance_scale=1.75") == (["generate", "guidance_scale"], 1.75)
    assert parse_override("store=s3://bucket/x") == (["store"], "s3://bucket/x")
    cfg = load_config(None, ["generate.num_samples=512", "generate.dtype=float16"])
    assert cfg.generate.num_samples == 512 and cfg.generate.dtype == "float16"
    assert load_config(None, ["distill.mixed_precision=no"]).distill.mixed_precision == "no"
    assert PipelineConfig.model_validate({"distill": {"mixed_precision": False}}).distill.mixed_precision == "no"
    with pytest.raises(InputError, match="section.key=value"):
        parse_override("generate.num_samples")


def test_content_key_depends_on_what_changes_the_bytes():
    cfg, gen = PipelineConfig(), spec("generate")
    base = gen.key(cfg, {"teacher": "a"})
    assert base == content_key("generate", gen.key_config(cfg), {"teacher": "a"}, gen.code_version)
    assert base == gen.key(PipelineConfig.model_validate({"generate": {"num_threads": 2}}), {"teacher": "a"})
    assert base != gen.key(PipelineConfig.model_validate({"generate": {"seed": 1}}), {"teacher": "a"})
    assert base != gen.key(cfg, {"teacher": "b"})
    assert base != content_key("generate", gen.key_config(cfg), {"teacher": "a"}, "v2")


def test_manifest_digest_ignores_the_config_record():
    from stages.store import FileEntry, Manifest

    def manifest(config_sha: str) -> Manifest:
        files = [FileEntry(name="pairs-000000.tar", size=1, sha256="a"), FileEntry(name="config.yaml", size=1, sha256=config_sha, record=True)]
        return Manifest(stage="generate", key="k", code_version="v", config={}, pipeline_config={}, upstream={}, files=files, wall_time_s=0)

    assert manifest("x").digest == manifest("y").digest
    other = manifest("x")
    other.files[0].sha256 = "b"
    assert other.digest != manifest("x").digest


def test_embedded_vp_config_points_at_the_vp_teacher():
    from stages.config import DEFAULT_CONFIG

    cfg = load_config(DEFAULT_CONFIG.parent / "digits-vp.yaml")
    assert cfg.teacher.path == str((DEFAULT_CONFIG.parent / "teacher-vp").resolve())
    assert (cfg.generate.solver, cfg.generate.steps) == ("pndm", 50)
    default = load_config()
    assert cfg.distill == default.distill and cfg.evaluate == default.evaluate  # only the teacher and solver differ


def test_embedded_text_to_image_config_and_teacher():
    """data/digits-t2i.yaml: the committed SD-layout teacher, its prompt files, and the guidance its sweep chose."""
    import json

    from dmd_core.digits_t2i import digit_prompts
    from dmd_core.loading import read_parametrization
    from dmd_core.text import read_prompt_labels, read_prompts
    from stages.config import DEFAULT_CONFIG

    cfg = load_config(DEFAULT_CONFIG.parent / "digits-t2i.yaml")
    param = read_parametrization(cfg.teacher.path)
    assert param.kind == "vp" and param.text_conditioned and param.image_shape == (4, 4, 4)
    train, held_out = read_prompts(cfg.generate.prompts), read_prompts(cfg.evaluate.prompts)
    assert train == [p for p, _ in digit_prompts("train")] and len(held_out) == 30 and not set(train) & set(held_out)
    assert read_prompt_labels(cfg.evaluate.prompts, cfg.evaluate.prompt_labels) == [d for _, d in digit_prompts("eval")]
    quality = json.loads((DEFAULT_CONFIG.parent / "teacher-t2i-quality.json").read_text())
    assert cfg.generate.guidance_scale == cfg.distill.guidance_scale == quality["guidance_scale"] == 1.25
    assert quality["prompt_accuracy"] >= 0.9

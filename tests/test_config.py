"""Config loading: defaults, overrides, relative paths, content keys."""

from __future__ import annotations

import pytest

from dmd_core.errors import InputError
from stages.config import DEFAULT_CONFIG, PipelineConfig, load_config, parse_override
from stages.contract import content_key, spec


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
    from stages.contract import FileEntry, Manifest

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
    from dmd_core.text import read_prompt_file, read_prompts
    from stages.config import DEFAULT_CONFIG

    cfg = load_config(DEFAULT_CONFIG.parent / "digits-t2i.yaml")
    param = read_parametrization(cfg.teacher.path)
    assert param.kind == "vp" and param.text_conditioned and param.image_shape == (4, 4, 4)
    train, held_out = read_prompts(cfg.generate.prompts), read_prompts(cfg.evaluate.prompts)
    assert train == [p for p, _ in digit_prompts("train")] and len(held_out) == 30 and not set(train) & set(held_out)
    assert read_prompt_file(cfg.evaluate.prompts, labels=cfg.evaluate.prompt_labels, num_classes=10).labels == [d for _, d in digit_prompts("eval")]
    quality = json.loads((DEFAULT_CONFIG.parent / "teacher-t2i-quality.json").read_text())
    assert cfg.generate.guidance_scale == cfg.distill.guidance_scale == quality["guidance_scale"] == 1.25
    assert quality["prompt_accuracy"] >= 0.9


def test_new_rules_keep_valid_values():
    """The bool / non-finite / betas / size / empty-path rules refuse only what they name."""
    cfg = load_config(None, [
        "generate.num_samples=1000000000", "distill.steps=1000000000", "distill.generator_optimizer.betas=[0, 0.999]",
        "distill.gan=true", "evaluate.use_ema=false", "distill.max_grad_norm=null", "distill.pairs=null", "generate.guidance_scale=2",
    ])  # fmt: skip
    assert cfg.generate.num_samples == 10**9 and cfg.distill.generator_optimizer.betas == (0.0, 0.999)
    assert cfg.distill.gan is True and cfg.evaluate.use_ema is False and cfg.distill.max_grad_norm is None
    assert isinstance(cfg.generate.guidance_scale, float)


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    """`<<: *anchor` then an overriding key is YAML's own way to share settings, not a duplicate."""
    path = tmp_path / "c.yaml"
    path.write_text(
        "distill:\n  generator_optimizer: &opt {lr: 1.0e-4, weight_decay: 0.01}\n"
        "  fake_optimizer:\n    <<: *opt\n    lr: 2.0e-4\n"
    )
    cfg = load_config(path)
    assert cfg.distill.fake_optimizer.lr == 2e-4 and cfg.distill.fake_optimizer.weight_decay == 0.01
    path.write_text("generate:\n  seed: 1\n  seed: 2\n")
    with pytest.raises(InputError, match="duplicate key 'seed' at line 3"):
        load_config(path)


def test_check_writable_never_creates_the_store(tmp_path):
    from stages.store import LocalStore

    LocalStore(tmp_path / "a" / "b" / "store").check_writable()
    LocalStore(tmp_path).check_writable()
    assert list(tmp_path.iterdir()) == []  # no store, no parents, no probe file left

"""The one resolver: teacher -> generate -> distill -> evaluate -> export, walked once.

``walk`` resolves the teacher and its digest once, plans each stage from the previous stage's output
(a plan is a pure function of the config and that output) and asks ``obtain`` for each output: the
command line reuses or builds it here, the flow runs a Prefect task, ``--only`` requires it to exist.
A stage whose explicit input is set (``distill.pairs``, ``evaluate.distill``) starts the chain there.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from dmd_core.denoisers import Denoiser, Parametrization
from dmd_core.errors import InputError
from dmd_core.loading import PARAM_FILE, WEIGHTS_FILE, latent_decoder, load_denoiser, load_prompt_encoder, load_vae, read_parametrization, resolve_model_dir

from .config import PipelineConfig, dump_config
from .registry import STAGES, StageSpec, spec
from .store import DIGESTS, StageOutput, dir_digest, read_manifest, reuse_or_build, verified_manifest, write_text_atomic


DENOISER_FILES = ("config.json", WEIGHTS_FILE, PARAM_FILE)  # what save_denoiser writes: every saved network has them


@dataclass(frozen=True)
class Teacher:
    """The resolved teacher: where it is, its digest and its parametrisation (no weights loaded)."""

    path: Path
    digest: str
    param: Parametrization

    def load(self, device="cpu", prompts: list[str] | None = None) -> Denoiser:
        """The weights, loaded when a stage is about to use them (a bad file fails here, named).

        A text-to-image teacher gets the prompt table of ``prompts`` from its own text encoder.
        """
        den = load_denoiser(self.path, device)
        if self.param.text_conditioned and prompts is not None:
            den.set_prompts(load_prompt_encoder(self.path, device).table(prompts))
        return den

    def pixel_shape(self) -> tuple[int, ...]:
        """C x H x W of the images the teacher makes: its model space, or the VAE's image side for latent teachers."""
        if not self.param.text_conditioned:
            return tuple(self.param.image_shape)
        vae = json.loads((self.path / "vae" / "config.json").read_text())
        f = 2 ** (len(vae["block_out_channels"]) - 1)
        _, h, w = self.param.image_shape
        return (vae.get("in_channels", 3), h * f, w * f)

    def pixel_decoder(self, device="cpu", gradient_checkpointing: bool = False, dtype: torch.dtype | None = None) -> Callable:
        """Model space -> pixels: the pipeline's VAE decoder for latent (text-to-image) teachers, else identity."""
        return latent_decoder(self.path, device, gradient_checkpointing, dtype) if self.param.text_conditioned else (lambda x: x)


def resolve_teacher(cfg: PipelineConfig) -> Teacher:
    """Resolve ``teacher.path`` and its digest (cached in the store); load its weights only when the
    digest is new here, so a bad teacher fails before anything is written and a cached run loads nothing."""
    path = resolve_model_dir(cfg.teacher.path)
    teacher = Teacher(path, dir_digest(path, cfg.store), read_parametrization(path))
    marker = Path(cfg.store) / DIGESTS / f"loads-{teacher.digest}"
    if not marker.is_file():
        teacher.load()  # raises an InputError naming the file and the fix
        if teacher.param.text_conditioned:
            load_prompt_encoder(path), load_vae(path)
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        except OSError:  # read-only store: validated again next time
            pass
    return teacher


@dataclass
class Plan:
    """What a stage will make: its content key and output directory, and the inputs it reads."""

    stage: str
    key: str
    out_dir: Path
    upstream: dict[str, str]  # name -> digest of each input (they are in the key)
    inputs: dict[str, str]  # name -> path of each input directory
    info: dict = field(default_factory=dict)  # stage-specific facts decided at planning time

    def save(self, path: str | Path) -> Path:
        # absolute paths: the reader (an accelerate worker, a flow task) may run elsewhere in the tree
        data = {**asdict(self), "out_dir": str(self.out_dir.resolve()), "inputs": {k: str(Path(v).resolve()) for k, v in self.inputs.items()}}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(data, indent=2) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        data = json.loads(Path(path).read_text())
        return cls(**{**data, "out_dir": Path(data["out_dir"])})

    def teacher(self) -> Teacher:
        """The teacher this plan was made for (digest as planned: no re-hash)."""
        path = Path(self.inputs["teacher"])
        return Teacher(path, self.upstream["teacher"], read_parametrization(path))


Obtain = Callable[[StageSpec, Plan], StageOutput]


def explicit_input(cfg: PipelineConfig, s: StageSpec) -> str | None:
    """The upstream output directory the config names for ``s`` (e.g. distill.pairs), if any."""
    return getattr(getattr(cfg, s.section), s.input_key) if s.input_key else None


def stages_for(cfg: PipelineConfig, target: str) -> list[StageSpec]:
    """The stages to walk for ``target``: back through its upstreams until one is given explicitly or not
    needed (distill without a regression loss reads no pairs, so generate is not in the graph)."""
    chain = [spec(target)]
    while chain[0].upstream is not None and explicit_input(cfg, chain[0]) is None and chain[0].needs_upstream(cfg):
        chain.insert(0, spec(chain[0].upstream))
    return chain


def given_output(s: StageSpec, path: str) -> StageOutput:
    """An explicitly configured upstream output (e.g. distill.pairs): complete and verified, or an error."""
    up = spec(s.upstream)
    where = f"{s.section}.{s.input_key}"
    d = Path(path)
    if not d.is_dir():
        raise InputError(f"{where}: no such directory {d}. Fix: run `dmd {up.name}` and pass the directory it prints.")
    listed = read_manifest(d)
    if listed is not None and listed.stage != up.name:
        raise InputError(f"{where}: {d} is a {listed.stage} output, not a {up.name} output. Fix: point it at a `dmd {up.name}` output directory.")
    m = verified_manifest(d)
    if m is None:
        detail = getattr(up.module, "incomplete_detail", lambda _: "")(d)
        raise InputError(
            f"{where}: {d} is not a complete {up.name} output (no verified manifest.json{detail}). "
            f"Fix: rerun `dmd {up.name}` with its config to finish it."
        )
    return StageOutput(d, m)


def walk(cfg: PipelineConfig, target: str, obtain: Obtain, obtain_upstream: Obtain | None = None) -> dict[str, StageOutput]:
    """Plan each stage up to ``target`` once and obtain its output; returns the outputs by stage."""
    teacher = resolve_teacher(cfg)
    stages = stages_for(cfg, target)
    for s in stages:  # every setting that can be checked is, before any stage computes (or writes)
        getattr(s.module, "check", lambda cfg, teacher: None)(cfg, teacher)
    given = explicit_input(cfg, stages[0]) if stages[0].needs_upstream(cfg) else None
    up = given_output(stages[0], given) if given is not None else None
    outputs: dict[str, StageOutput] = {}
    for s in stages:
        p = s.module.plan(cfg, teacher, up)
        get = obtain if s.name == target or obtain_upstream is None else obtain_upstream
        up = outputs[s.name] = get(s, p)
    return outputs


def local_obtain(cfg: PipelineConfig, num_processes: int = 1, progress: bool = True) -> Obtain:
    """Reuse a verified output in the store, else build it here (or on ``num_processes`` processes)."""
    text = dump_config(cfg)

    def obtain(s: StageSpec, p: Plan) -> StageOutput:
        n = num_processes if s.multi_process else 1
        m = reuse_or_build(s.name, p.out_dir, text, lambda work: s.module.build(cfg, replace(p, out_dir=work), n, progress))
        return StageOutput(p.out_dir, m)

    return obtain


def require_existing(s: StageSpec, p: Plan) -> StageOutput:
    """The stage's verified output in the store, or an error naming the stage to run first."""
    m = verified_manifest(p.out_dir)
    if m is None:
        raise InputError(f"the {s.name} output is missing from the store ({p.out_dir}). Fix: run the pipeline (or --only {s.name}) first.")
    return StageOutput(p.out_dir, m)


def run(cfg: PipelineConfig, target: str, num_processes: int = 1, progress: bool = True) -> StageOutput:
    """``target``'s output for ``cfg``, running whatever upstream stage is missing first."""
    return walk(cfg, target, local_obtain(cfg, num_processes, progress))[target]


def plan(cfg: PipelineConfig, target: str) -> Plan:
    """``target``'s plan; its upstream outputs must already be in the store."""
    found: list[Plan] = []

    def capture(s: StageSpec, p: Plan) -> StageOutput:
        found.append(p)
        return StageOutput(p.out_dir, None)  # type: ignore[arg-type]

    walk(cfg, target, capture, require_existing)
    return found[-1]


__all__ = ["Plan", "Teacher", "STAGES", "walk", "run", "plan", "resolve_teacher", "local_obtain", "require_existing", "given_output"]

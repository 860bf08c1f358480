"""How far a golden test's numbers move with the CPU's kernels: the tolerances of those tests are measured here.

    .venv/bin/python tests/kernel_spread.py MODULE:FUNCTION [MODULE:FUNCTION ...] [--reference MODULE:NAME]

Each FUNCTION (in tests/MODULE.py, no arguments) returns {name: number} or a number. It runs in a fresh process for every
thread count (1, 2) and every kernel choice below that this CPU can run; the output gives, per name, the
largest relative difference to the reference (the absolute one where the reference is 0) and the run that
gave it. The reference is FUNCTION's own run on 1 thread with this CPU's default kernels unless --reference
names one: a function or a constant (e.g. the test's golden numbers). Not collected by pytest: it takes minutes.

Kernel choices, each read by a library when the process starts:
  ATEN_CPU_CAPABILITY=default|avx2|avx512  PyTorch's own kernels (elementwise, reductions, norms); avx512 only
                                           where the CPU has it (elsewhere the process dies of SIGILL)
  ONEDNN_MAX_CPU_ISA=SSE41|AVX             oneDNN's float32 convolutions (the default takes this CPU's best)
  MKL_CBWR=COMPATIBLE                      MKL's matrix products (float64 convolutions are matrix products)
Another CPU's own kernels (e.g. oneDNN's AVX-512 convolutions) cannot be run here; the tests' tolerances say
which CPUs were measured.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def kernel_choices() -> list[tuple[str, dict[str, str]]]:
    flags = " ".join(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    choices = [("this CPU's defaults", {}), ("ATEN default", {"ATEN_CPU_CAPABILITY": "default"})]
    if "avx2" in flags:
        choices.append(("ATEN avx2", {"ATEN_CPU_CAPABILITY": "avx2"}))
    if "avx512f" in flags:
        choices.append(("ATEN avx512", {"ATEN_CPU_CAPABILITY": "avx512"}))
    choices += [
        ("oneDNN SSE41", {"ONEDNN_MAX_CPU_ISA": "SSE41"}),
        ("oneDNN AVX", {"ONEDNN_MAX_CPU_ISA": "AVX"}),
        ("MKL COMPATIBLE", {"MKL_CBWR": "COMPATIBLE"}),
        ("all generic", {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_CBWR": "COMPATIBLE"}),
    ]
    return choices


def run(target: str, threads: int, env: dict[str, str]) -> dict[str, float]:
    module, name = target.split(":")
    code = (
        f"import json, sys, torch; sys.path.insert(0, {str(TESTS)!r}); torch.set_num_threads({threads}); "
        f"from {module} import {name}; v = {name}() if callable({name}) else {name}; "
        f"print(json.dumps(v if isinstance(v, dict) else {{'value': v}}))"
    )
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, cwd=TESTS.parent)
    if out.returncode:
        raise SystemExit(f"{target} with {env}, {threads} thread(s) failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


ZERO = 1e-12  # a reference this small is 0 up to rounding (the tests' abs=1e-12): its differences are absolute


def difference(got: float, want: float) -> float:
    return abs(got - want) / abs(want) if abs(want) > ZERO else abs(got - want)


def main(argv: list[str]) -> None:
    reference_target = None
    if "--reference" in argv:
        i = argv.index("--reference")
        reference_target, argv = argv[i + 1], argv[:i] + argv[i + 2 :]
    import torch

    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    for target in argv:
        runs = {(threads, name): run(target, threads, env) for name, env in kernel_choices() for threads in (1, 2)}
        reference = run(reference_target, 1, {}) if reference_target else runs[(1, "this CPU's defaults")]
        print(f"\n{target} against {reference_target or 'its run on 1 thread, defaults'} ({len(runs)} runs)")
        largest = 0.0
        for key, want in reference.items():
            worst, where = max((difference(r[key], want), f"{t} thread(s), {name}") for (t, name), r in runs.items())
            kind = "rel" if abs(want) > ZERO else "abs"
            print(f"  {key:32s} {want: .16g}  max {kind} diff {worst:.3g}  ({where if worst else 'every run equal'})")
            if abs(want) > ZERO:
                largest = max(largest, worst)
        spread = max(difference(a[k], b[k]) for a in runs.values() for b in runs.values() for k in a if abs(b[k]) > ZERO)
        print(f"  largest rel diff to the reference {largest:.3g}; largest between two runs {spread:.3g}")
        if not math.isfinite(largest):
            raise SystemExit("non-finite numbers")


if __name__ == "__main__":
    main(sys.argv[1:])

"""Two runs of the same stage at once on one store: one builds, the other waits and reuses; both
print the same complete output, equal to a lone run's."""

from __future__ import annotations

import pytest

from common import leftovers, product_files, start_forked, wait_forked
from test_kill import pipeline  # noqa: F401


@pytest.mark.parametrize("stage", ["generate", pytest.param("distill", marks=pytest.mark.faults_full), pytest.param("export", marks=pytest.mark.faults_full)])
def test_two_identical_runs_at_once(pipeline, tmp_path, stage):  # noqa: F811
    store = pipeline.store_before(stage, tmp_path / "store")
    pids = [start_forked(pipeline.args(stage, store), tmp_path / f"run{i}.log") for i in range(2)]
    codes = [wait_forked(pid) for pid in pids]
    logs = [(tmp_path / f"run{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], "\n---\n".join(log[-2000:] for log in logs)
    printed = {log.strip().splitlines()[-1] for log in logs}
    out = pipeline.output(stage, store)
    assert printed == {str(out)}
    assert product_files(out) == product_files(pipeline.output(stage))
    assert leftovers(store) == []

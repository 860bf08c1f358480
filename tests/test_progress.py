"""Progress lines: what the stages print under the flow and what the flow parses from them."""

from __future__ import annotations

from stages.progress import ProgressLines, parse_progress, progress_bar


def test_lines_are_at_most_one_per_percent_and_parse_back(capsys, monkeypatch):
    monkeypatch.setenv("DMD_PROGRESS_LINES", "1")
    bar = progress_bar("distill", 1000, show=True, initial=250)
    assert isinstance(bar, ProgressLines)
    for _ in range(750):
        bar.update(1)
    lines = capsys.readouterr().out.splitlines()
    parsed = [parse_progress(line) for line in lines]
    assert len(lines) == 76  # 25%, then one line per whole percent up to 100%
    assert parsed[0].done == 250 and parsed[-1].done == 1000 and parsed[-1].percent == 100.0
    assert [p.percent for p in parsed] == sorted(p.percent for p in parsed)


def test_phase_with_spaces_survives_the_round_trip(capsys, monkeypatch):
    monkeypatch.setenv("DMD_PROGRESS_LINES", "1")
    bar = progress_bar("evaluate", 8, show=True)
    bar.set_description("teacher (35 NFE)")
    bar.update(3)
    p = parse_progress(capsys.readouterr().out.splitlines()[-1])
    assert (p.stage, p.done, p.total, p.phase) == ("evaluate", 3, 8, "teacher (35 NFE)")
    assert p.percent == 37.5


def test_ordinary_lines_and_quiet_bars(capsys, monkeypatch):
    assert parse_progress("dmd: generate: cached output") is None
    assert parse_progress("dmd-progress distill x 10") is None
    monkeypatch.setenv("DMD_PROGRESS_LINES", "1")
    progress_bar("generate", 10, show=False).update(10)  # rank != 0 or --quiet: nothing at all
    monkeypatch.delenv("DMD_PROGRESS_LINES")
    progress_bar("generate", 10, show=True).update(10)  # a terminal: tqdm on stderr, stdout untouched
    assert capsys.readouterr().out == ""


def test_the_flow_turns_progress_lines_into_throttled_artifact_updates(monkeypatch):
    import io
    import queue
    from collections import deque

    import flows.pipeline as fp

    calls, clock = [], [0.0]
    monkeypatch.setattr(fp, "create_progress_artifact", lambda **kw: "artifact-id")
    monkeypatch.setattr(fp, "update_progress_artifact", lambda aid, progress, description: calls.append((progress, description)))
    monkeypatch.setattr(fp.time, "monotonic", lambda: clock[0])
    stream = io.StringIO("".join(f"dmd-progress distill {n} 10\nstep {n} done\n" for n in range(1, 11)))
    events, tail, logged = queue.Queue(), deque(), []
    fp._pump(stream, logged.append, tail, events)
    assert logged == [f"step {n} done" for n in range(1, 11)]  # progress lines never reach the log
    art = fp.ProgressArtifact("distill")
    while not events.empty():
        clock[0] += 0.4  # an event every 0.4 s: at most one update per second goes out
        art.update(events.get())
    art.finish(0)
    assert calls[:-1] == [(30.0, "distill: 3/10"), (60.0, "distill: 6/10"), (90.0, "distill: 9/10")]
    assert calls[-1] == (100.0, "distill: finished")

"""Progress lines: what the stages print under the flow and what the flow parses from them."""

from __future__ import annotations

from stages.progress import Progress, ProgressLines, parse_progress, progress_bar


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


def test_the_unit_rides_along_before_the_phase(capsys, monkeypatch):
    monkeypatch.setenv("DMD_PROGRESS_LINES", "1")
    progress_bar("generate", 2048, show=True, unit="img", phase="8 shards").update(1065)
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "dmd-progress generate 1065 2048 img 8 shards"
    assert parse_progress(lines[-1]) == Progress("generate", 1065, 2048, "8 shards", "img")
    assert parse_progress("dmd-progress distill 3 10") == Progress("distill", 3, 10, "", "")


# The flow's status line on stderr (flows/terminal.py): a fake clock, a StringIO for the terminal.

GEN = [Progress("generate", 0, 2048, "8 shards", "img"), Progress("generate", 1065, 2048, "8 shards", "img")]


def _status(stage, tty, width=200):
    import io

    from flows.terminal import StatusLine

    clock, buf = [0.0], io.StringIO()
    return StatusLine(stage, buf, lambda: clock[0], tty=tty, width=width), clock, buf


def test_on_a_terminal_the_line_is_redrawn_in_place_and_ended_with_a_newline():
    line, clock, buf = _status("generate", tty=True)
    clock[0] = 0.5
    line.update()  # the same text: not drawn again
    clock[0] = 2.0
    line.update(GEN[0])
    clock[0] = 43.0
    line.update(GEN[1])
    clock[0] = 43.4
    line.update()
    clock[0] = 60.0
    line.update(Progress("generate", 2048, 2048, "8 shards", "img"))
    clock[0] = 62.0
    line.finish(0)
    assert buf.getvalue().split("\r\x1b[K") == [
        "",
        "generate: running (00:00)",
        "generate  [----------]   0%  0/2048 img  8 shards  00:02 elapsed",
        "generate  [#####-----]  52%  1065/2048 img  8 shards  00:43 elapsed, ~00:37 left",  # 1065 img in 41 s
        "generate  [##########] 100%  2048/2048 img  8 shards  01:00 elapsed, finishing",
        "generate: done in 01:02\n",
    ]
    assert buf.getvalue().count("\n") == 1


def test_on_a_terminal_the_line_fits_its_width_and_a_failure_says_so():
    line, clock, buf = _status("generate", tty=True, width=30)
    line.update(GEN[1])
    clock[0] = 5.0
    line.finish(3)
    drawn = buf.getvalue().split("\r\x1b[K")
    assert drawn[-2] == "generate  [#####-----]  52%  "  # 29 columns: the cursor stays on the line
    assert drawn[-1] == "generate: failed (exit status 3) after 00:05\n"


def test_elsewhere_a_plain_line_at_start_phase_changes_every_5_s_and_end():
    line, clock, buf = _status("evaluate", tty=False)
    for t in (1, 2, 3, 4):
        clock[0] = t
        line.update()  # heartbeat ticks under 5 s: no line
    clock[0] = 4.5
    line.update(Progress("evaluate", 0, 100, "teacher (35 NFE)", "batch"))  # first progress: a line
    for t in (5, 6, 7, 8, 9):
        clock[0] = t
        line.update(Progress("evaluate", 10 * (t - 4), 100, "teacher (35 NFE)", "batch"))  # under 5 s since: none
    clock[0] = 9.5
    line.update()  # 5 s since the last line
    clock[0] = 10.0
    line.update(Progress("evaluate", 55, 100, "one-step", "batch"))  # a phase change: a line at once
    clock[0] = 11.0
    line.finish(0)
    assert buf.getvalue().splitlines() == [
        "evaluate: running (00:00)",
        "evaluate  [----------]   0%  0/100 batch  teacher (35 NFE)  00:04 elapsed",
        "evaluate  [#####-----]  50%  50/100 batch  teacher (35 NFE)  00:09 elapsed, ~00:04 left",  # 50 in 4.5 s
        "evaluate  [#####-----]  55%  55/100 batch  one-step  00:10 elapsed",
        "evaluate: done in 00:11",
    ]
    assert "\r" not in buf.getvalue()


def test_a_stage_without_progress_gets_a_heartbeat():
    plain, clock, buf = _status("export", tty=False)
    for i in range(1, 25):  # the task's loop: an update every 0.5 s
        clock[0] = i / 2
        plain.update()
    plain.finish(0)
    assert buf.getvalue().splitlines() == ["export: running (00:00)", "export: running (00:05)", "export: running (00:10)", "export: done in 00:12"]

    tty, clock, buf = _status("distill", tty=True)  # loading its teacher before the first step
    for i in range(1, 7):
        clock[0] = i / 2
        tty.update()
    tty.finish(None)
    assert buf.getvalue().split("\r\x1b[K") == [
        "",
        *(f"distill: running (00:0{s})" for s in range(4)),  # redrawn once a second
        "distill: stopped after 00:03\n",
    ]


def test_status_goes_to_stderr_never_stdout(capsys):
    from flows.terminal import StatusLine

    line = StatusLine("generate", clock=lambda: 0.0)  # on sys.stderr (pytest's capture: not a terminal)
    line.update(GEN[1])
    line.finish(0)
    StatusLine.cached("distill")
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines()[0] == "generate: running (00:00)" and err.splitlines()[-2:] == ["generate: done in 00:00", "distill: cached"]


def test_log_lines_clear_the_in_place_line_and_it_is_redrawn_after():
    import logging

    line, clock, buf = _status("generate", tty=True)
    log = logging.getLogger("dmd-test-terminal")
    handler = logging.StreamHandler(buf)
    log.addHandler(handler)
    log.propagate = False
    try:
        line.update(GEN[1])
        with line.sharing():
            log.warning("shard 3 written")
        log.warning("after the stage")  # the handler is itself again
    finally:
        log.removeHandler(handler)
    bar = "generate  [#####-----]  52%  1065/2048 img  8 shards  00:00 elapsed"
    assert buf.getvalue() == f"\r\x1b[Kgenerate: running (00:00)\r\x1b[K{bar}\r\x1b[Kshard 3 written\n{bar}after the stage\n"
    assert "emit" not in vars(handler)

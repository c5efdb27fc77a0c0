"""Stall detection of a starting engine (activities.engines.StallWatch) and the log lines
its failure quotes: a fake log file and a fake clock, no engine."""

from __future__ import annotations

from pathlib import Path

from activities.engines import StallWatch, log_last_lines, log_size


def test_a_log_that_stops_growing_is_a_stall(tmp_path: Path) -> None:
    log = tmp_path / "engine.log"
    log.write_text("INFO starting\n")
    watch = StallWatch(5.0, now=100.0, log_size=log_size(log))
    for t in (101.0, 102.0, 103.0):  # keeps logging: never stalled, however long
        with log.open("a") as fh:
            fh.write(f"INFO step at {t}\n")
        assert not watch.observe(t, log_size=log_size(log))
    # Silent from 103 s on: not yet at 107.9 s, stalled at 108 s.
    assert not watch.observe(107.9, log_size=log_size(log))
    assert watch.observe(108.0, log_size=log_size(log))
    assert watch.silent_for(108.0) == 5.0


def test_a_health_answer_is_progress(tmp_path: Path) -> None:
    watch = StallWatch(5.0, now=0.0, log_size=0)
    assert not watch.observe(4.0, log_size=0, answered=True)
    assert not watch.observe(8.9, log_size=0)
    assert watch.observe(9.0, log_size=0)


def test_a_log_that_appears_late_is_progress(tmp_path: Path) -> None:
    log = tmp_path / "late.log"
    watch = StallWatch(2.0, now=0.0, log_size=log_size(log))
    assert log_size(log) == 0
    log.write_text("INFO hello\n")
    assert not watch.observe(1.9, log_size=log_size(log))
    assert not watch.observe(3.0, log_size=log_size(log))
    assert watch.observe(3.9, log_size=log_size(log))


def test_the_failure_quotes_the_logs_last_lines(tmp_path: Path) -> None:
    log = tmp_path / "engine.log"
    log.write_text("".join(f"line {i}\n" for i in range(20))
                   + "Loading safetensors: 50%\rLoading safetensors: 75%\r\n\n")
    tail = log_last_lines(log, count=3)
    # A progress bar's carriage returns end lines too: its last state is the last line.
    assert tail == "line 19 | Loading safetensors: 50% | Loading safetensors: 75%"
    assert log_last_lines(tmp_path / "missing.log") == "(no engine log)"
    (tmp_path / "empty.log").write_text("")
    assert log_last_lines(tmp_path / "empty.log") == "(engine log is empty)"

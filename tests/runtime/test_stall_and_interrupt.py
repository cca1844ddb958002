"""A stalled rank stops the run within --collective-timeout and is named; Ctrl-C stops every rank.

Real processes: `ropesp generate --world-size 2` on gloo (rank 0 is the command's own process, rank 1 the
rank it spawned), a rank stopped with SIGSTOP mid-stream, SIGINT or SIGTERM to the whole process group (a
terminal's Ctrl-C) or to the command alone.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

GENERATE = [sys.executable, "-m", "ropesp.cli", "generate", "--preset", "tiny", "--device", "cpu"]
GENERATE += ["--latent-height", "8", "--latent-width", "8", "--latent-frames", "150", "--world-size", "2"]


def _children(pid: int) -> list[int]:
    """Live direct children of pid, oldest first (the ranks, in rank order: started one by one)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry))
    return sorted(found)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Run:
    """The launcher in its own session; its stderr collected; `streaming` set once chunk 1 is out."""

    def __init__(self, tmp_path, *extra: str) -> None:
        cmd = [*GENERATE, *extra, "--output", str(tmp_path / "v.mp4")]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, start_new_session=True)
        self.err = b""
        self.streaming = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while chunk := self.proc.stderr.read1(4096):
            self.err += chunk
            done = [int(n) for n in re.findall(rb"\| (\d+)/50 ", self.err)]  # rank 0's tqdm bar
            if done and 2 <= max(done) < 40:  # chunks are out: every rank is streaming
                self.streaming.set()

    def ranks(self) -> list[int]:
        spawned = _children(self.proc.pid)
        assert len(spawned) == 1, spawned
        return [self.proc.pid, *spawned]

    def finish(self, timeout_s: float) -> tuple[int, str]:
        code = self.proc.wait(timeout_s)
        time.sleep(0.2)  # the reader thread drains the pipe
        return code, self.err.decode(errors="replace")

    def kill(self) -> None:
        for pid in _children(self.proc.pid):
            os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def run(tmp_path):
    runs = []

    def start(*extra: str) -> Run:
        runs.append(Run(tmp_path, *extra))
        assert runs[-1].streaming.wait(120), runs[-1].err.decode(errors="replace")
        return runs[-1]

    yield start
    for r in runs:
        r.kill()


def test_a_stopped_rank_is_named_within_the_collective_timeout(run):
    r = run("--collective-timeout", "3")
    ranks = r.ranks()
    t0 = time.monotonic()
    os.kill(ranks[1], signal.SIGSTOP)
    code, err = r.finish(60)
    elapsed = time.monotonic() - t0
    assert code == 1, err
    message = "a collective waited longer than --collective-timeout 3 s: rank 1 stalled (stopped or hung)"
    assert f"ropesp: error: {message}" in err
    assert "Traceback" not in err
    assert elapsed < 3 + 5 + 2 * 3 + 10, elapsed  # timeout + stall probe + kill grace, not 300 s
    assert not any(_alive(p) for p in ranks)


@pytest.mark.parametrize(
    ("target", "sig"), [("group", signal.SIGINT), ("launcher", signal.SIGINT), ("launcher", signal.SIGTERM)]
)
def test_a_signal_stops_every_rank_with_one_line(run, tmp_path, target, sig):
    r = run("--frames-dir", str(tmp_path / "frames"))
    ranks = r.ranks()
    if target == "group":
        os.killpg(r.proc.pid, sig)  # a terminal's Ctrl-C reaches every process of its group
    else:
        os.kill(r.proc.pid, sig)
    code, err = r.finish(30)
    assert code == 128 + sig, err
    assert err.endswith("ropesp: interrupted\n") and err.count("ropesp: interrupted") == 1, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and "error" not in err, err
    assert not any(_alive(p) for p in ranks)
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a stopped run leaves the directory as it was"


def test_collective_timeout_must_be_positive(tmp_path, capsys):
    from ropesp.cli import main

    assert main([*GENERATE[3:], "--collective-timeout", "0", "--output", str(tmp_path / "v.mp4")]) == 2
    assert "--collective-timeout 0.0 must be > 0 seconds" in capsys.readouterr().err

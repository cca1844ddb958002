"""A stalled rank stops the run within --collective-timeout and is named; Ctrl-C stops every rank.

Real processes: `ropesp generate --world-size 2` on gloo, a rank stopped with SIGSTOP mid-stream, SIGINT
to the whole process group (a terminal's Ctrl-C) or to the launcher alone.
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
        ranks = _children(self.proc.pid)
        assert len(ranks) == 2, ranks
        return ranks

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


@pytest.mark.parametrize(
    ("stopped", "message"),
    [
        (
            1,
            "(rank 0): a collective waited longer than --collective-timeout 3 s: rank 1 stalled (stopped or hung)",
        ),
        (0, "(rank 1): a collective waited longer than --collective-timeout 3 s: rank 0 stalled (stopped)"),
    ],
)
def test_stopped_rank_is_named_within_the_collective_timeout(run, stopped, message):
    r = run("--collective-timeout", "3")
    ranks = r.ranks()
    t0 = time.monotonic()
    os.kill(ranks[stopped], signal.SIGSTOP)
    code, err = r.finish(60)
    elapsed = time.monotonic() - t0
    assert code == 2, err
    assert f"ropesp: error {message}" in err
    assert "Traceback" not in err
    assert elapsed < 3 + 5 + 2 * 3 + 10, elapsed  # timeout + stall probe + kill grace, not 300 s
    assert not any(_alive(p) for p in ranks)


@pytest.mark.parametrize("target", ["group", "launcher"])
def test_sigint_stops_every_rank_with_one_line(run, target):
    r = run()
    ranks = r.ranks()
    if target == "group":
        os.killpg(r.proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches every process
    else:
        os.kill(r.proc.pid, signal.SIGINT)
    code, err = r.finish(30)
    assert code == 130, err
    assert err.endswith("ropesp: interrupted\n") and err.count("ropesp: interrupted") == 1, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and "error" not in err, err
    assert not any(_alive(p) for p in ranks)


def test_collective_timeout_must_be_positive(tmp_path, capsys):
    from ropesp.cli import main

    assert main([*GENERATE[3:], "--collective-timeout", "0", "--output", str(tmp_path / "v.mp4")]) == 2
    assert "--collective-timeout 0.0 must be > 0 seconds" in capsys.readouterr().err

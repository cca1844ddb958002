"""`ropesp serve` refuses bad ports and empty repositories, and cleans up after a killed predecessor."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from helpers_triton import CONFIG, alive, descendants, require_triton

from ropesp.cli import main
from ropesp.runtime.ranks import free_port
from ropesp.serving.repository import write_repository
from ropesp.serving.server import WORKDIR_PREFIX, TritonServer, remove_stale_workdirs


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--http-port", "70000"], "--http-port 70000 must be a TCP port in 1..65535"),
        (["--grpc-port", "0"], "--grpc-port 0 must be a TCP port in 1..65535"),
        (["--http-port", "-5"], "--http-port -5 must be a TCP port in 1..65535"),
        (["--http-port", "8123", "--grpc-port", "8123"], "are both 8123; give two different ports"),
    ],
)
def test_bad_ports_refused(tmp_path, capsys, args, message):
    write_repository(tmp_path / "repo", CONFIG)
    assert main(["serve", "--repo", str(tmp_path / "repo"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_repository_without_models_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    repo = tmp_path / "repo"
    (repo / "notes").mkdir(parents=True)
    assert main(["serve", "--repo", str(repo)]) == 2
    err = capsys.readouterr().err
    assert f"--repo {repo}: the model repository holds no model (no <model>/config.pbtxt)" in err
    assert "ready" not in err and not list(tmp_path.glob(f"{WORKDIR_PREFIX}*"))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_workdirs_removed_and_live_or_foreign_ones_kept(tmp_path):
    stale, live, foreign = (tmp_path / f"{WORKDIR_PREFIX}{n}" for n in ("stale", "live", "foreign"))
    for d in (stale, live, foreign):
        (d / "backends").mkdir(parents=True)
    (stale / "owner.pid").write_text(f"{_dead_pid()} {_dead_pid()}\n")
    (live / "owner.pid").write_text(f"{_dead_pid()} {os.getpid()}\n")  # its server still runs
    # foreign: no owner file (not written by this module): never touched
    assert remove_stale_workdirs(tmp_path) == [stale]
    assert not stale.exists() and live.is_dir() and foreign.is_dir()


@pytest.mark.slow
def test_serve_killed_with_sigkill_leaves_nothing_for_the_next_start(tmp_path, monkeypatch):
    require_triton()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    repo = tmp_path / "repo"
    write_repository(repo, CONFIG)
    http = free_port()
    cmd = [sys.executable, "-m", "ropesp.cli", "serve", "--repo", str(repo), "--http-port", str(http)]
    proc = subprocess.Popen(cmd, env=dict(os.environ, TMPDIR=str(tmp)), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        for line in proc.stderr:
            if "tritonserver ready" in line or time.monotonic() > deadline:
                break
        assert proc.poll() is None, "ropesp serve did not start"
        procs = descendants(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 60  # the server gets SIGTERM when its parent dies, and exits
        while [p for p in procs if alive(p)] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in procs if alive(p)], procs
        assert len(list(tmp.glob(f"{WORKDIR_PREFIX}*"))) == 1  # what SIGKILL leaves behind
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    with TritonServer(repo, ready_timeout_s=180) as server:
        assert server.is_ready()
        assert list(tmp.glob(f"{WORKDIR_PREFIX}*")) == [server._workdir]  # the stale one is gone
    assert not list(tmp.glob(f"{WORKDIR_PREFIX}*"))


def test_stop_returns_where_an_interrupt_leaked_popens_lock(tmp_path):
    """A Ctrl-C landing inside Popen.poll() between its lock's acquire and its try leaves the lock held,
    and every later Popen.wait() blocks for ever: `ropesp serve` once hung 90 s on its Ctrl-C in the full
    suite. stop() must still end the server within its grace period (here a sleeper that SIGTERM ends)."""
    import threading

    server = TritonServer(tmp_path / "repo", stop_timeout_s=5)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    server.proc = proc
    proc._waitpid_lock.acquire()  # what the interrupt leaves behind
    try:
        stopper = threading.Thread(target=server.stop, daemon=True)
        t0 = time.monotonic()
        stopper.start()
        stopper.join(timeout=30)
        assert not stopper.is_alive(), "stop() hung on Popen's leaked lock"
        assert time.monotonic() - t0 < 5, "SIGTERM ends the sleeper at once: no wait for the grace period"
    finally:
        proc._waitpid_lock.release()
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGTERM

"""ropesp.processes: a child's exit is waited for without Popen's lock, which an interrupt can leak."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

from ropesp.processes import exited, stop_process, wait_exit


def _sleeper(seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])


def test_wait_exit_times_out_then_sees_the_exit_and_reaps():
    proc = _sleeper(60)
    try:
        assert not exited(proc) and not wait_exit(proc, 0.1)
        proc.terminate()
        assert wait_exit(proc, 10) and proc.returncode == -signal.SIGTERM
        assert exited(proc)
    finally:
        proc.kill()
        proc.wait()


def test_stop_process_kills_after_the_grace_period_with_popens_lock_held():
    """The lock held as a Ctrl-C inside Popen.poll() leaves it: Popen.wait() would block for ever."""
    proc = _sleeper(60)
    proc._waitpid_lock.acquire()
    try:
        stopper = threading.Thread(target=stop_process, args=(proc, 0.2), daemon=True)
        t0 = time.monotonic()
        stopper.start()
        stopper.join(timeout=30)
        assert not stopper.is_alive(), "stop_process hung on Popen's lock"
        assert 0.2 <= time.monotonic() - t0 < 10
        assert exited(proc)  # killed: a zombie until Popen may reap it
    finally:
        proc._waitpid_lock.release()
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL

"""Waiting for child processes without Popen's internal lock.

An interrupt (Ctrl-C, or SIGTERM turned into KeyboardInterrupt) that lands inside `Popen.poll()` between
its lock's acquire and its `try` leaks the lock, and every later `Popen.wait()` of that process blocks for
ever: the stop path that runs right after such an interrupt (a server's, a rank group's) would hang. These
helpers ask the kernel instead (waitid with WNOWAIT, which leaves the child for Popen to reap).
"""

from __future__ import annotations

import os
import subprocess
import time


def exited(proc: subprocess.Popen) -> bool:
    """Whether proc has exited (reaped or not), without taking Popen's lock."""
    if proc.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # reaped already (by Popen in another call)
        return True


def wait_exit(proc: subprocess.Popen, timeout_s: float | None) -> bool:
    """Wait up to timeout_s seconds (None: no limit) for proc to exit; whether it did. Then reaps it
    (Popen.poll(), which skips the reaping where the lock is held: a zombie until this process exits, not
    a hang)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not exited(proc):
        if deadline is not None and time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    proc.poll()
    return True


def stop_process(proc: subprocess.Popen, grace_s: float) -> None:
    """End a child: wait up to grace_s seconds for it to exit (on whatever the caller told or sent it),
    then SIGKILL it and wait for that."""
    if not wait_exit(proc, grace_s):
        proc.kill()
        wait_exit(proc, None)

"""Run the real Triton Inference Server of the `nvidia-pytriton` wheel on a model repository.

    with TritonServer("repo") as server:        # ready when entered, always stopped on exit
        client = tritonclient.grpc.InferenceServerClient(server.grpc_url)

The wheel carries `tritonserver`, the python backend and backend stubs per Python version
(docs/PLATFORM.md). Setting up: a backend directory with a copy of backends/python plus the stub for the
repository's Python, LD_LIBRARY_PATH = that Python's libpython directory (so the stub runs the very
environment that holds ropesp) + the wheel's nvidia_pytriton.libs. The server binds to 127.0.0.1 only,
runs in its own process group (so every stub and worker rank can be reaped with it), and is stopped
with SIGTERM (graceful: models unload, worker ranks exit), then SIGKILL.

Triton may live apart from ropesp's environment: the stub crashes on numpy 2 (its streamed responses
arrive empty, or the stub dies), which the wheel's own metadata pins as numpy < 2, while the rest of a
modern environment wants numpy 2. `pip install --target DIR --no-deps nvidia-pytriton 'numpy<2'` and
ROPESP_TRITON_HOME=DIR serve from that directory, and its numpy goes first on the model's sys.path (the
repository's model.py reads ROPESP_STUB_PATH, which the server sets).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path

from ropesp.errors import BackendUnavailableError, ConfigError, RopespError, arg
from ropesp.processes import exited, stop_process, wait_exit
from ropesp.serving.repository import PythonEnv, recorded_python

READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0
"""SIGTERM -> SIGKILL grace; Triton itself waits up to EXIT_TIMEOUT_S for in-flight requests."""
EXIT_TIMEOUT_S = 30
LOG_TAIL_LINES = 40
PR_SET_PDEATHSIG = 1
WORKDIR_PREFIX = "ropesp-triton-"
OWNER_FILE = "owner.pid"
"""In a server's work directory: '<launching pid> <server pid>', so a later start can tell it is stale."""


TRITON_HOME = "ROPESP_TRITON_HOME"
"""Environment variable: a directory holding nvidia-pytriton (and the stub's numpy < 2) apart from the
environment that holds ropesp; unset: the installed wheel."""
STUB_PATH = "ROPESP_STUB_PATH"
"""Environment variable the server sets for the stubs: directories put first on the model's sys.path."""


class ServerError(RopespError):
    """tritonserver failed to start, died, or did not become ready; the message has its log tail."""


def triton_home() -> Path | None:
    """The directory ROPESP_TRITON_HOME names (absolute), None where it is unset."""
    home = os.environ.get(TRITON_HOME)
    return Path(home).resolve() if home else None


def find_triton() -> tuple[Path, Path]:
    """(pytriton/tritonserver directory, nvidia_pytriton.libs) of the wheel in ROPESP_TRITON_HOME, else
    of the installed one."""
    home = triton_home()
    if home is not None:
        package = home / "pytriton"
        if not package.is_dir():
            raise BackendUnavailableError(
                f"{TRITON_HOME}={os.environ[TRITON_HOME]} holds no Triton: pip install --target "
                f"{os.environ[TRITON_HOME]} --no-deps nvidia-pytriton 'numpy<2'"
            )
    else:
        spec = importlib.util.find_spec("pytriton")  # located, not imported
        if spec is None or not spec.submodule_search_locations:
            raise BackendUnavailableError(
                "Triton Inference Server is not installed: pip install 'ropesp[serve]' (nvidia-pytriton), or "
                f"into a directory of its own named by {TRITON_HOME}"
            )
        package = Path(next(iter(spec.submodule_search_locations)))
    root, libs = package / "tritonserver", package.parent / "nvidia_pytriton.libs"
    if not (root / "bin" / "tritonserver").is_file():
        raise BackendUnavailableError(f"{root} has no bin/tritonserver: reinstall nvidia-pytriton")
    return root, libs


def _free_port(taken: int | None = None) -> int:
    """A free loopback port other than `taken` (two probes in a row can get the same port back)."""
    from ropesp.runtime.ranks import free_port

    while (port := free_port()) == taken:
        pass
    return port


def _libc_prctl():
    with contextlib.suppress(OSError, AttributeError):
        return ctypes.CDLL(None, use_errno=True).prctl
    return None


_PRCTL = _libc_prctl() if sys.platform == "linux" else None
"""Resolved here, so the forked child only calls it (no dynamic loading between fork and exec)."""


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM when the launching thread dies, so no server is orphaned."""
    _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)


class TritonServer:
    """A tritonserver process on 127.0.0.1 serving one model repository."""

    def __init__(
        self,
        repo: str | Path,
        *,
        http_port: int | None = None,
        grpc_port: int | None = None,
        python: PythonEnv | None = None,
        log_path: str | Path | None = None,
        ready_timeout_s: float = READY_TIMEOUT_S,
        stop_timeout_s: float = STOP_TIMEOUT_S,
    ) -> None:
        for flag, port in (("--http-port", http_port), ("--grpc-port", grpc_port)):
            if port is not None and not (isinstance(port, int) and 1 <= port <= 65535):
                raise ConfigError(f"{flag} {port} must be a TCP port in 1..65535")
        if http_port is not None and http_port == grpc_port:
            raise ConfigError(f"--http-port and --grpc-port are both {http_port}; give two different ports")
        self.repo = Path(repo).resolve()
        self.http_port = http_port or _free_port(grpc_port)
        self.grpc_port = grpc_port or _free_port(self.http_port)
        self.python = python or recorded_python(self.repo) or PythonEnv.current()
        self.log_path = Path(log_path) if log_path else None
        self.ready_timeout_s, self.stop_timeout_s = ready_timeout_s, stop_timeout_s
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None
        """The server's pid, also its process group id (every stub and worker rank is in it)."""
        self.last_log = ""
        """The log tail at stop() (the log itself is removed unless log_path was given)."""
        self._workdir: Path | None = None
        self._own_log = False
        self._sigterm = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def command(self, backends: Path) -> list[str]:
        root, _ = find_triton()
        return [
            str(root / "bin" / "tritonserver"),
            f"--model-repository={self.repo}",
            f"--backend-directory={backends}",
            "--http-address=127.0.0.1",
            "--grpc-address=127.0.0.1",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            "--allow-metrics=false",
            "--disable-auto-complete-config",
            f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
        ]

    def _backends(self, workdir: Path) -> Path:
        """backends/python = the wheel's python backend + the stub built for the repository's Python."""
        root, _ = find_triton()
        stub = root / "python_backend_stubs" / self.python.version / "triton_python_backend_stub"
        if not stub.is_file():
            have = sorted(p.name for p in (root / "python_backend_stubs").iterdir())
            raise BackendUnavailableError(
                f"nvidia-pytriton has no python backend stub for Python {self.python.version} (it has {have})"
            )
        backend = workdir / "backends" / "python"
        shutil.copytree(root / "backends" / "python", backend, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(stub, backend / stub.name)
        return backend.parent

    def _env(self) -> dict[str, str]:
        _, libs = find_triton()
        paths = [self.python.libdir] if self.python.libdir and os.path.isdir(self.python.libdir) else []
        paths += [str(libs), *filter(None, [os.environ.get("LD_LIBRARY_PATH")])]
        env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(paths))
        home = triton_home()
        if home is not None and (home / "numpy").is_dir():  # the stub's numpy < 2 before the environment's
            env[STUB_PATH] = str(home)
        return env

    def start(self) -> TritonServer:
        """Start tritonserver and wait until it is ready; stops it again if that fails."""
        if not self.repo.is_dir():
            raise ServerError(f"{arg('repo', self.repo)}: the model repository does not exist")
        if not any(self.repo.glob("*/config.pbtxt")):
            raise ServerError(
                f"{arg('repo', self.repo)}: the model repository holds no model (no <model>/config.pbtxt); "
                f"write one with `ropesp serve-repo --out {self.repo}`"
            )
        remove_stale_workdirs()
        self._workdir = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX))
        (self._workdir / OWNER_FILE).write_text(f"{os.getpid()} 0\n")
        self._own_log = self.log_path is None
        self.log_path = self.log_path or self._workdir / "tritonserver.log"
        try:
            backends = self._backends(self._workdir)
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    self.command(backends),
                    env=self._env(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_die_with_parent if _PRCTL is not None else None,
                )
            self.pid = self.proc.pid
            (self._workdir / OWNER_FILE).write_text(f"{os.getpid()} {self.pid}\n")
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while not self.is_ready():
            if exited(self.proc):
                self.proc.poll()  # reaps it: its status for the message
                raise ServerError(
                    f"tritonserver exited with status {self.proc.returncode} before it was ready; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise ServerError(
                    f"tritonserver was not ready after {self.ready_timeout_s:.0f} s; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.25)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return self.last_log
        with open(self.log_path, errors="replace") as f:
            return "".join(deque(f, maxlen=lines))

    def wait(self) -> None:
        """Block while the server runs (inside `with`, SIGINT and SIGTERM raise KeyboardInterrupt, and the
        exit stops the server); raises ServerError if it dies on its own."""
        wait_exit(self.proc, None)
        raise ServerError(
            f"tritonserver exited with status {self.proc.returncode}; log tail:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """SIGTERM (models unload, worker ranks shut down), SIGKILL after stop_timeout_s; then reap the
        server's process group, so no stub or worker rank outlives it. Idempotent."""
        proc, self.proc = self.proc, None
        try:
            if proc is not None and not exited(proc):  # never Popen.wait(): see ropesp.processes
                proc.send_signal(signal.SIGTERM)
                stop_process(proc, self.stop_timeout_s)
        finally:
            if proc is not None:
                with contextlib.suppress(ProcessLookupError):  # nothing left in the group: clean
                    os.killpg(proc.pid, signal.SIGKILL)
            if self._workdir is not None:
                self.last_log = self.log_tail()
                shutil.rmtree(self._workdir, ignore_errors=True)
                self._workdir = None
                if self._own_log:
                    self.log_path = None

    def __enter__(self) -> TritonServer:
        self._sigterm = None
        if threading.current_thread() is threading.main_thread():  # SIGTERM stops it like Ctrl-C
            self._sigterm = signal.signal(signal.SIGTERM, _interrupt)
        try:
            return self.start()
        except BaseException:
            self._restore_sigterm()
            raise

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            self._restore_sigterm()

    def _restore_sigterm(self) -> None:
        if self._sigterm is not None:
            signal.signal(signal.SIGTERM, self._sigterm)
            self._sigterm = None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    try:  # a zombie (no init reaps orphans in some containers) is gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def remove_stale_workdirs(tmp: str | Path | None = None) -> list[Path]:
    """Remove the work directories of servers whose launching process and server are both gone (a
    `ropesp serve` killed with SIGKILL cannot clean up after itself); returns them. Only directories
    with this module's prefix, this user's, holding an owner file, are considered."""
    removed = []
    for workdir in Path(tmp or tempfile.gettempdir()).glob(f"{WORKDIR_PREFIX}*"):
        owner = workdir / OWNER_FILE
        try:
            if workdir.is_symlink() or workdir.stat().st_uid != os.getuid() or not owner.is_file():
                continue
            pids = [int(p) for p in owner.read_text().split()]
        except (OSError, ValueError):
            continue
        if pids and not any(_pid_alive(p) for p in pids):
            shutil.rmtree(workdir, ignore_errors=True)
            removed.append(workdir)
    return removed


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")

"""The ropesp engine behind Triton's python backend (decoupled): `TritonPythonModel`.

A repository's `1/model.py` (written by `ropesp serve-repo`) puts the recorded environment on sys.path
and imports this class. Each instance owns one engine core (runtime/engine_core.py): its ranks, a KV
cache slot per stream, its decoder.

Requests:
    stream    prompt_embeds FP32 [L, text_dim] or prompt STRING (text through the model's text encoder),
              seed INT64 [1] (default 0), latent_frames INT32 [1] (default: the engine's video length; 0:
              until cancelled, with the rolling window), stream_id STRING (to steer it), height/width
              (checked against what the engine serves). One response per chunk (frames, latents,
              chunk_index, timing_ms, prompt_version; only the outputs the request names), then an
              empty final response. Streams run concurrently, interleaved chunk by chunk by the engine;
              beyond its capacity a request gets an "at capacity" error at once.
    control   control STRING "swap" | "recache" | "cut" | "cancel" | "end", stream_id, and for a prompt change
              the new prompt_embeds or prompt: answered at once (chunk_index: the last chunk that stream
              had finished, -1 before its first or once it has ended); the change comes into effect at the
              stream's next chunk boundary on every rank. "end" leaves the stream alone: it is the
              request that closes the stream's sequence (below), valid whether the stream runs or not.
A bad request gets an error response that names the input; the model keeps serving.

Sequences: a request may carry a Triton sequence (correlation) ID, a string or an unsigned integer; a
stream's ID is its stream_id (a stream request without the stream_id input takes its sequence ID as
stream_id). A repository of several instances (`serve-repo --instances N`, instances.py) has Triton's
sequence batcher, which sends every request of one sequence ID to the instance that holds it, and refuses
a request without one: the stream request starts the sequence (START flag), its control requests carry
the same ID without flags, and the client's last request, an "end" control, carries the END flag, which
frees Triton's slot for it (repository.py sequence_batching).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time

from ropesp.serving import stub_env

_IMPORTS = [("environment", time.perf_counter())]
import numpy as np  # noqa: E402

_IMPORTS.append(("numpy", time.perf_counter()))
import torch  # noqa: E402

_IMPORTS.append(("torch", time.perf_counter()))
from ropesp.errors import ConfigError, RopespError, python_names  # noqa: E402
from ropesp.settings import PROMPT_MODES  # noqa: E402

IMPORTED = time.perf_counter()

OUTPUTS = ("frames", "latents", "chunk_index", "timing_ms", "prompt_version")
"""Every response's outputs, in config.pbtxt's order; a request may name a subset."""
CONTROLS = (*PROMPT_MODES, "cancel", "end")


def _backend():
    import triton_python_backend_utils as pb_utils

    return pb_utils


class _Running:
    """A stream being served: its engine stream, its sender thread and the last chunk it sent."""

    def __init__(self, stream, stream_id: str | None) -> None:
        self.stream, self.stream_id = stream, stream_id
        self.last_chunk = -1
        self.thread: threading.Thread | None = None


class TritonPythonModel:
    """One Triton model instance: one engine core that serves many streams at once."""

    def initialize(self, args) -> None:
        started = time.perf_counter()
        pb = _backend()
        from ropesp.runtime.engine_core import EngineCore
        from ropesp.runtime.pipeline import resolve
        from ropesp.runtime.prompts import PromptEncoder, default_prompt_embeds
        from ropesp.serving.instances import pin_instance_gpus
        from ropesp.serving.repository import read_model_config

        if not pb.using_decoupled_model_transaction_policy(json.loads(args["model_config"])):
            raise pb.TritonModelException("the ropesp model streams: its config must be decoupled")
        if int(np.__version__.split(".")[0]) >= 2:  # the backend stub's responses would arrive empty
            raise pb.TritonModelException(
                f"numpy {np.__version__} in {sys.executable}'s environment: the python backend stub of "
                "nvidia-pytriton 0.7 needs numpy < 2 (pip install 'numpy<2', or install Triton apart: pip "
                "install --target DIR --no-deps nvidia-pytriton 'numpy<2' and serve with ROPESP_TRITON_HOME=DIR)"
            )
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        served = read_model_config(version_dir)
        self.name = args.get("model_instance_name", "")
        self.instances = served.instances
        # this instance's GPUs, set before anything initialises CUDA here (resolve looks for GPUs)
        gpus = pin_instance_gpus(served.config, _instance_index(args), served.instances)
        res = resolve(served.config)
        python = served.python.executable
        if not os.path.exists(python):  # relocated: the interpreter that runs this stub
            python = os.path.join(sys.exec_prefix, "bin", "python" + served.python.version)
        self.core = EngineCore(res, python=python, python_path=served.python.path).start()
        self.prompts = PromptEncoder(res)
        # on a GPU every KV cache slot's CUDA graphs are captured now, not while a client waits
        warm_ms = self.core.warm_up(
            self.core.check_prompt(default_prompt_embeds(res.model)),
            None if res.cache.rolling else res.latent_frames,
        )
        self.running: dict[str, _Running] = {}
        self.threads: set[threading.Thread] = set()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        ready = time.perf_counter()
        start = stub_env.STARTED or started
        # where a cold load goes (scripts/serve_latency.py reads these lines from the server's log)
        starts = [start, *(t for _, t in _IMPORTS)]
        steps = ", ".join(f"{name} {t - t0:.2f} s" for (name, t), t0 in zip(_IMPORTS, starts, strict=False))
        cache = sys.pycache_prefix or "beside the sources"
        written = "not written" if sys.dont_write_bytecode else "written"
        pb.Logger.log_info(f"ropesp: imports: {steps} (bytecode cache {cache}, {written})")
        pb.Logger.log_info(
            f"ropesp: ready in {ready - start:.2f} s from the model module's start (imports {IMPORTED - start:.2f} s, "
            f"until initialize {started - IMPORTED:.2f} s, engine and decoder {ready - started - warm_ms / 1e3:.2f} s, "
            f"warm up {warm_ms / 1e3:.2f} s)"
        )
        where = f" (CUDA_VISIBLE_DEVICES={','.join(gpus)})" if gpus is not None else ""
        pb.Logger.log_info(
            f"ropesp: {self.name}: serving a {res.model.num_layers}-layer model, world size {res.world_size}, "
            f"{res.backend} on {res.device}{where}, {res.max_streams} streams at once (numpy {np.__version__} from "
            f"{os.path.dirname(os.path.dirname(np.__file__))})"
        )

    # --- requests -----------------------------------------------------------------------------------
    def execute(self, requests):
        """Start or steer streams; the responses stream from each stream's thread."""
        for request in requests:
            arrived = time.perf_counter()
            sender = request.get_response_sender()
            try:
                with python_names():  # a request's inputs are named as Python names them (latent_frames=4)
                    control = self._string(request, "control")
                    if control is not None:
                        self._control(request, sender, control)
                        continue
                    wanted = set(request.requested_output_names()) or set(OUTPUTS)
                    running = self._start(request, "frames" in wanted)
            except Exception as exc:  # the client's mistake, or the engine at capacity: reply, keep serving
                self._reply_error(sender, exc)
                continue
            thread = threading.Thread(
                target=self._serve, args=(running, sender, arrived, wanted), name="ropesp-stream", daemon=True
            )
            running.thread = thread
            with self.lock:
                self.threads.add(thread)
            thread.start()
        return None

    def _input(self, request, name: str):
        tensor = _backend().get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()

    def _string(self, request, name: str) -> str | None:
        arr = self._input(request, name)
        if arr is None:
            return None
        arr = arr.reshape(-1)
        if arr.size != 1:
            raise ConfigError(f"input {name} must hold one string, got {arr.size}")
        value = arr[0]
        if isinstance(value, bytes):
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError:
                raise ConfigError(f"input {name} is not UTF-8 text") from None
        return str(value)

    def _integer(self, request, name: str) -> int | None:
        arr = self._input(request, name)
        if arr is None:
            return None
        if arr.size != 1:
            raise ConfigError(f"input {name} must hold one value, got shape {list(arr.shape)}")
        if arr.dtype.kind not in "iu":
            raise ConfigError(f"input {name} must be an integer, got {arr.dtype}")
        return int(arr.reshape(-1)[0])

    def _prompt(self, request) -> torch.Tensor:
        """prompt_embeds or prompt (text), checked, naming the input."""
        text = self._string(request, "prompt")
        embeds = self._input(request, "prompt_embeds")
        if (text is None) == (embeds is None):
            raise ConfigError(
                "give the prompt as prompt_embeds (FP32 [L, text_dim]) or as prompt (STRING), one of them"
            )
        if text is not None:
            try:
                return self.core.check_prompt(self.prompts(text), "prompt")
            except ConfigError as exc:
                raise ConfigError(f"input prompt: {exc}") from None
        if embeds.dtype != np.float32:
            raise ConfigError(f"input prompt_embeds must be FP32 [L, text_dim], got {embeds.dtype}")
        return self.core.check_prompt(torch.from_numpy(np.array(embeds)), "prompt_embeds")

    def _stream_id(self, request) -> str | None:
        """The stream a request names: its stream_id input, else its sequence ID. With several instances
        Triton routes by the sequence ID, so a stream_id that differs from it is refused."""
        given = self._string(request, "stream_id")
        sequence = _sequence_id(request)
        if given is None:
            return sequence
        if self.instances > 1 and sequence is not None and given != sequence:
            raise ConfigError(
                f"input stream_id {given!r} differs from the request's sequence ID {sequence!r}: with "
                f"{self.instances} instances Triton routes a stream's requests by the sequence ID; give the "
                "stream_id as the sequence ID"
            )
        return given

    def _routing_hint(self) -> str:
        if self.instances == 1:
            return ""
        return (
            f" on this instance ({self.name} of {self.instances}; a control request reaches its stream's "
            "instance only with the stream's sequence ID, within the sequence's idle time)"
        )

    def _start(self, request, frames: bool) -> _Running:
        seed = self._integer(request, "seed")
        latent_frames = self._integer(request, "latent_frames")
        if latent_frames is None:
            latent_frames = self.core.res.latent_frames
        if _flags(request) & _backend().TRITONSERVER_REQUEST_FLAG_SEQUENCE_END:
            raise ConfigError(
                "a stream request must not end its sequence (END flag): its control requests could no longer "
                'reach it; end the sequence with an "end" control once the stream is done'
            )
        stream_id = self._stream_id(request)
        req = self.core.request(
            self._prompt(request),
            0 if seed is None else seed,
            None if latent_frames == 0 else latent_frames,
            height=self._integer(request, "height"),
            width=self._integer(request, "width"),
            decode=frames and self.core.decoder is not None,
            live=stream_id is not None,  # steerable: its DiT stays a few chunks ahead, not the whole video
        )
        with self.lock:
            if stream_id is not None and stream_id in self.running:
                raise ConfigError(f"stream_id {stream_id!r} is already running")
            running = _Running(self.core.open(req), stream_id)
            if stream_id is not None:
                self.running[stream_id] = running
        if stream_id is not None:  # which instance holds which stream (an operator's question)
            _backend().Logger.log_info(f"ropesp: {self.name}: stream {stream_id!r} started")
        return running

    def _control(self, request, sender, control: str) -> None:
        """Steer a running stream and answer at once."""
        pb = _backend()
        if control not in CONTROLS:
            raise ConfigError(f"input control {control!r}: choose one of {', '.join(CONTROLS)}")
        if _flags(request) & pb.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START:
            # a new sequence could be given a slot of another instance than the one holding the stream
            raise ConfigError(
                "a control request must not start a sequence (START flag): only its stream's request does"
            )
        stream_id = self._stream_id(request)
        if stream_id is None:
            raise ConfigError(
                "a control request needs the stream_id (or sequence ID) of the stream it steers"
            )
        with self.lock:
            running = self.running.get(stream_id)
        if control == "end":  # closes the sequence (its END flag), whether the stream still runs or not
            self._answer(sender, running.last_chunk if running is not None else -1)
            return
        prompt = None if control == "cancel" else self._prompt(request)
        if running is None:
            raise ConfigError(f"no stream with stream_id {stream_id!r} is running{self._routing_hint()}")
        if control == "cancel":
            running.stream.cancel()
        elif not running.stream.set_prompt(prompt, control):
            raise ConfigError(f"stream {stream_id!r} has ended")
        self._answer(sender, running.last_chunk)

    @staticmethod
    def _answer(sender, last_chunk: int) -> None:
        """A control request's one response: chunk_index INT32 [1], the stream's last finished chunk."""
        pb = _backend()
        response = pb.InferenceResponse(
            output_tensors=[pb.Tensor("chunk_index", np.array([last_chunk], dtype=np.int32))]
        )
        sender.send(response, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _serve(self, running: _Running, sender, arrived: float, wanted: set[str]) -> None:
        """One response per chunk; a cancelled request (or an unload) ends the stream at the next chunk."""
        pb = _backend()
        try:
            for chunk in running.stream:
                running.last_chunk = chunk.index
                sender.send(self._response(chunk, arrived, wanted))
                if sender.is_cancelled() or self.stopping.is_set():
                    running.stream.cancel()
                    if sender.is_cancelled():
                        pb.Logger.log_info(f"ropesp: request cancelled after chunk {chunk.index}")
            sender.send(flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as exc:  # reported to the client; the other streams go on
            running.stream.cancel()
            self._reply_error(sender, exc)
        finally:
            with self.lock:
                if running.stream_id is not None and self.running.get(running.stream_id) is running:
                    del self.running[running.stream_id]
                self.threads.discard(threading.current_thread())

    @staticmethod
    def _response(chunk, arrived, wanted):
        pb = _backend()
        ms = (time.perf_counter() - arrived) * 1e3
        arrays = {
            "frames": lambda: np.ascontiguousarray(chunk.frames[0].numpy()),
            "latents": lambda: np.ascontiguousarray(chunk.latents[0].numpy()),
            "chunk_index": lambda: np.array([chunk.index], dtype=np.int32),
            "timing_ms": lambda: np.array([ms], dtype=np.float32),
            "prompt_version": lambda: np.array([chunk.prompt_version], dtype=np.int32),
        }
        names = [n for n in OUTPUTS if n in wanted and not (n == "frames" and chunk.frames is None)]
        return pb.InferenceResponse(output_tensors=[pb.Tensor(name, arrays[name]()) for name in names])

    @staticmethod
    def _reply_error(sender, exc: BaseException) -> None:
        pb = _backend()
        message = str(exc) if isinstance(exc, (RopespError, ValueError)) else f"{type(exc).__name__}: {exc}"
        try:
            sender.send(
                pb.InferenceResponse(error=pb.TritonError(message)),
                flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
            )
        except Exception as send_exc:  # the client is gone; nothing left to tell it
            pb.Logger.log_warn(f"ropesp: could not send the error {message!r}: {send_exc}")

    def finalize(self) -> None:
        """Unload: end every stream at its next chunk, stop the engine and its ranks."""
        self.stopping.set()
        with self.lock:
            running = list(self.running.values())
            threads = list(self.threads)
        for r in running:
            r.stream.cancel()
        self.core.close()
        for thread in threads:
            with contextlib.suppress(RuntimeError):
                thread.join(30)
        _backend().Logger.log_info("ropesp: unloaded (ranks stopped)")


def _sequence_id(request) -> str | None:
    """The request's Triton sequence (correlation) ID as text; None without one (0 or "")."""
    value = request.correlation_id()
    return str(value) if value not in (0, "", None) else None


def _flags(request) -> int:
    """The request's sequence flags (START 1, END 2)."""
    return int(request.flags())


def _instance_index(args) -> int:
    """This instance's index among the model's instances (Triton names them <model>_<group>_<index>)."""
    name = args.get("model_instance_name", "")
    tail = name.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else 0

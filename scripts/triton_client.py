"""Stream a video from a ropesp Triton model over gRPC: per-chunk arrival times, then an MP4.

    python scripts/triton_client.py --url 127.0.0.1:8001 --prompt "two blue discs bouncing" --output out.mp4
    python scripts/triton_client.py --url 127.0.0.1:8001 --prompt-embeds prompt.pt --latent-frames 21

--prompt sends text, which the served model encodes (the demo model's own encoder, or umT5); without it or
--prompt-embeds the client sends ropesp's seeded default embedding. The model is decoupled:
one response per chunk (frames, latents, chunk_index, timing_ms, prompt_version), then an empty final
response. `--prompt-at CHUNK PATH` steers the running stream: once chunk CHUNK-1 has arrived, a control
request (same stream_id) sends the new prompt, which the server applies at the stream's next chunk
boundary (`--prompt-mode swap|recache`).

Every stream runs as a Triton sequence whose ID is its stream_id (a fresh UUID): the stream request
starts it, its control requests carry the same ID, and an "end" control with the END flag closes it once
the stream is over. A repository of several instances (`ropesp serve-repo --instances N`) needs this:
Triton's sequence batcher sends every request of one ID to the instance that holds the stream.
"""

from __future__ import annotations

import argparse
import contextlib
import queue
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

MODEL = "ropesp"
TIMEOUT_S = 600.0
VIEWER_OUTPUTS = ("frames", "chunk_index", "timing_ms")
"""What this script's MP4 needs: the latents stay on the server."""


@dataclass
class StreamedChunk:
    """One response of the stream, as the client saw it."""

    index: int
    frames: np.ndarray | None
    """[N, H, W, 3] uint8 (None when not requested)."""
    latents: np.ndarray | None
    """[F_chunk, C, h, w] float32 (None when not requested)."""
    server_ms: float | None
    """timing_ms: server time from the request's arrival to this chunk (None when not requested)."""
    arrival_ms: float
    """Client time from sending the request to receiving this chunk."""
    prompt_version: int | None = None
    """Prompt changes in effect for this chunk (0: the first prompt; None when not requested)."""


def _tensor(name, arr, dtype):
    import tritonclient.grpc as grpcclient

    t = grpcclient.InferInput(name, list(arr.shape), dtype)
    t.set_data_from_numpy(arr)
    return t


def _text(name: str, value: str):
    return _tensor(name, np.array([value.encode()], dtype=np.object_), "BYTES")


def _prompt_input(prompt):
    """A prompt as the model takes it: text (STRING `prompt`) or embeddings (FP32 `prompt_embeds`)."""
    if isinstance(prompt, str):
        return _text("prompt", prompt)
    return _tensor("prompt_embeds", prompt, _triton_dtype(prompt))


def make_inputs(prompt, seed: int, latent_frames: int | None, height=None, width=None, stream_id=None):
    """The model's inputs; dtypes as given (the server rejects wrong ones). prompt: text or embeddings
    [L, text_dim]; latent_frames None: the served engine's length (0: until cancelled); stream_id: a name
    that control requests (make_control) can steer this stream by."""
    inputs = [_prompt_input(prompt), _tensor("seed", np.array([seed], dtype=np.int64), "INT64")]
    if latent_frames is not None:
        inputs.append(_tensor("latent_frames", np.array([latent_frames], dtype=np.int32), "INT32"))
    for name, value in (("height", height), ("width", width)):
        if value is not None:
            inputs.append(_tensor(name, np.array([value], dtype=np.int32), "INT32"))
    if stream_id is not None:
        inputs.append(_text("stream_id", stream_id))
    return inputs


def make_control(prompt, stream_id: str, mode: str = "swap"):
    """A control request: the stream `stream_id` takes `prompt` (text or embeddings) from its next chunk
    boundary on (mode swap | recache); prompt None for "cancel" and "end"."""
    inputs = [_text("stream_id", stream_id), _text("control", mode)]
    return inputs if prompt is None else [_prompt_input(prompt), *inputs]


def _triton_dtype(arr: np.ndarray) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(arr.dtype)


class Controller:
    """A gRPC stream kept open for control requests (no connection setup per prompt change)."""

    def __init__(self, url: str, model: str = MODEL) -> None:
        import tritonclient.grpc as grpcclient

        self.model = model
        self.responses: queue.Queue = queue.Queue()
        self.client = grpcclient.InferenceServerClient(url)
        self.client.start_stream(callback=lambda result, error: self.responses.put((result, error)))

    def send(self, inputs, timeout_s: float = 60.0, sequence_id: str | None = None, end: bool = False) -> int:
        """Send a control request; returns the last chunk its stream had finished when it arrived (-1:
        none yet). sequence_id: the stream's (its stream_id), so Triton routes the request to the instance
        that holds the stream; end: the sequence's last request (END flag). Raises
        InferenceServerException for an error reply (e.g. an unknown stream_id)."""
        self.client.async_stream_infer(
            self.model,
            inputs,
            request_id=uuid.uuid4().hex,
            sequence_id=sequence_id or 0,
            sequence_end=end,
        )
        result, error = self.responses.get(timeout=timeout_s)
        if error is not None:
            raise error
        return int(result.as_numpy("chunk_index")[0])

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()

    def __enter__(self) -> Controller:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def control(
    url: str,
    inputs,
    model: str = MODEL,
    timeout_s: float = 60.0,
    sequence_id: str | None = None,
    end: bool = False,
) -> int:
    """One control request on its own connection (Controller.send)."""
    with Controller(url, model) as controller:
        return controller.send(inputs, timeout_s, sequence_id, end)


def end_sequence(url: str, sequence_id: str, model: str = MODEL, timeout_s: float = 60.0) -> None:
    """Close a stream's sequence: an "end" control with the END flag (Triton frees the sequence's slot;
    the stream itself is left alone). Best effort: where Triton never started the sequence (a request it
    refused) the reply is an error, and a sequence left open is freed after the model's idle time anyway."""
    from tritonclient.utils import InferenceServerException

    with contextlib.suppress(InferenceServerException):
        control(url, make_control(None, sequence_id, "end"), model, timeout_s, sequence_id, end=True)


def stream(
    url: str,
    inputs,
    model: str = MODEL,
    timeout_s: float = TIMEOUT_S,
    outputs: Sequence[str] | None = None,
    sequence_id: str | None = None,
) -> Iterator[StreamedChunk]:
    """Send one request on its own gRPC stream and yield its chunks in arrival order.

    outputs: the outputs to receive (default all; chunk_index is always added); the server skips the
    decoder without "frames", and every output left out is bytes not sent (a 480p chunk's frames are
    ~11 MB, its latents ~1.2 MB). sequence_id: run the stream as that Triton sequence (the stream's
    stream_id: its control requests carry it too), started by this request and closed (end_sequence)
    once the stream is over, however it ends.

    Raises tritonclient's InferenceServerException for an error reply. Leaving the loop early closes
    the stream with cancel_requests=True, so the server stops the request at its next chunk.
    """
    import tritonclient.grpc as grpcclient

    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    finished = False
    try:
        t0 = time.perf_counter()
        requested = None
        if outputs is not None:  # chunk_index always: it tells a chunk from the final response
            names = dict.fromkeys([*outputs, "chunk_index"])
            requested = [grpcclient.InferRequestedOutput(name) for name in names]
        client.async_stream_infer(
            model,
            inputs,
            outputs=requested,
            request_id=uuid.uuid4().hex,
            sequence_id=sequence_id or 0,
            sequence_start=sequence_id is not None,
            enable_empty_final_response=True,
        )
        while True:
            result, error = responses.get(timeout=timeout_s)
            if error is not None:
                finished = True
                raise error
            arrival_ms = (time.perf_counter() - t0) * 1e3
            index = result.as_numpy("chunk_index")
            if index is not None:  # a chunk (the empty final response has no outputs)
                timing = result.as_numpy("timing_ms")
                version = result.as_numpy("prompt_version")
                yield StreamedChunk(
                    int(index[0]),
                    result.as_numpy("frames"),
                    result.as_numpy("latents"),
                    None if timing is None else float(timing[0]),
                    arrival_ms,
                    None if version is None else int(version[0]),
                )
            if result.get_response().parameters["triton_final_response"].bool_param:
                finished = True
                return
    finally:
        client.stop_stream(cancel_requests=not finished)
        client.close()
        if sequence_id is not None:  # after the stop: a stream left early is cancelled first
            end_sequence(url, sequence_id, model)


def _prompt(args, url: str, model: str):
    """--prompt (text, encoded by the served model's text encoder), the --prompt-embeds file, else the
    seeded default embedding for the served model's text_dim."""
    from ropesp.config import ModelConfig
    from ropesp.runtime.prompts import default_prompt_embeds, load_prompt_embeds

    if args.prompt is not None:
        return args.prompt
    if args.prompt_embeds:
        return load_prompt_embeds(args.prompt_embeds)[0].numpy().astype(np.float32)
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(url) as client:
        meta = client.get_model_metadata(model, as_json=True)
    dims = next(i["shape"] for i in meta["inputs"] if i["name"] == "prompt_embeds")
    return default_prompt_embeds(ModelConfig(text_dim=int(dims[-1])))[0].numpy()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default="127.0.0.1:8001", help="gRPC address of tritonserver")
    p.add_argument("--model", default=MODEL)
    text = p.add_mutually_exclusive_group()
    text.add_argument(
        "--prompt",
        help="text, encoded on the server by the model's text encoder (e.g. 'two blue discs bouncing')",
    )
    text.add_argument("--prompt-embeds", help=".pt [L, text_dim] / [1, L, text_dim] or .safetensors")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--latent-frames",
        type=int,
        help="a multiple of the chunk frames (default: the served engine's length)",
    )
    p.add_argument("--height", type=int, help="pixels (must be the size the repository serves)")
    p.add_argument("--width", type=int)
    p.add_argument(
        "--output", default="triton.mp4", help="MP4 path (written only when the stream is complete)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds to wait for each chunk")
    p.add_argument(
        "--prompt-at",
        nargs=2,
        action="append",
        metavar=("CHUNK", "PROMPT"),
        help="steer the stream: send PROMPT (text with --prompt, else an embeddings file) once chunk CHUNK-1 "
        "has arrived (repeatable)",
    )
    p.add_argument("--prompt-mode", choices=["swap", "recache"], default="swap")
    args = p.parse_args(argv)

    from tritonclient.utils import InferenceServerException

    from ropesp.cli.generate import prompt_changes
    from ropesp.errors import RopespError
    from ropesp.runtime.prompts import load_prompt_embeds
    from ropesp.video import StreamOutputs, check_outputs

    try:
        paths = check_outputs(args.output, overwrite=args.overwrite)  # before any request
        prompt = _prompt(args, args.url, args.model)
        steer = {  # chunks checked as generate's: integers >= 1, each once
            k - 1: value if args.prompt is not None else load_prompt_embeds(value, "--prompt-at")[0].numpy()
            for k, value in prompt_changes(args.prompt_at)
        }
    except RopespError as exc:
        print(f"triton_client: error: {exc}", file=sys.stderr)
        return 2
    stream_id = uuid.uuid4().hex  # also the stream's sequence ID
    inputs = make_inputs(prompt, args.seed, args.latent_frames, args.height, args.width, stream_id)
    refused: dict[int, str] = {}
    """{chunk after which a change was sent: the server's answer} for changes the stream did not take."""
    last = -1
    controller = Controller(args.url, args.model) if steer else None
    try:
        with StreamOutputs(paths) as out:  # the MP4 appears at --output only once the stream is complete
            outputs = (*VIEWER_OUTPUTS, "prompt_version")
            for chunk in stream(args.url, inputs, args.model, args.timeout, outputs, sequence_id=stream_id):
                out.write(chunk.frames)
                last = chunk.index
                print(
                    f"chunk {chunk.index}: arrived at {chunk.arrival_ms:8.1f} ms "
                    f"(server {chunk.server_ms:8.1f} ms), {len(chunk.frames)} frames "
                    f"{chunk.frames.shape[1]}x{chunk.frames.shape[2]}, prompt {chunk.prompt_version}",
                    file=sys.stderr,
                )
                if chunk.index in steer:
                    change = make_control(steer.pop(chunk.index), stream_id, args.prompt_mode)
                    try:
                        controller.send(change, sequence_id=stream_id)
                    except InferenceServerException as exc:  # judged once the stream is over
                        refused[chunk.index] = exc.message()
            for after, message in refused.items():
                if after < last:  # the stream ran on: the server refused the change itself
                    raise InferenceServerException(message)
            if refused or steer:
                k = min([*refused, *steer]) + 1
                print(
                    f"triton_client: error: --prompt-at {k}: the stream ended after chunk {last} ({last + 1} "
                    "chunks) before the change could apply; ask for a longer stream with --latent-frames",
                    file=sys.stderr,
                )
                return 2
            out.commit()
    except InferenceServerException as exc:
        print(f"triton_client: error: {exc.message()}", file=sys.stderr)
        return 2
    except RopespError as exc:  # e.g. the disk refused the MP4
        print(f"triton_client: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if controller is not None:
            controller.close()
    print(f"wrote {args.output} ({out.frames_written} frames)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Engine executor: the segments of `ropesp build` driven like the eager model (same three calls).

Per chunk forward (segments: export/segments.py):
    embed(latents, t_sinusoid) -> tokens, e, e0;  runner.shard(tokens)
    per layer: pre(x, e0, start_frame, frame_of_token) -> q, k, v;  runner.attention(layer, q, k, v) -> o
               post(x, o, e0, cross_k, cross_v, frame_of_token) -> x   (block `layer`'s weights as inputs)
    head(x, e, frame_of_token) -> out;  runner.gather(out);  unpatchify
The runner is SPState's (runtime/runners.py), as in the eager path: the token shard, the all-to-alls /
ring around attention, the persistent KV cache write and the attention itself run here, between engine
calls. Cross-attention K/V come from the eager text path (CausalWanDiT.cross_kv on the loaded weights),
once per prompt, into buffers whose addresses never change (CUDA graphs and TensorRT bindings read them).

Backends: `ort` (ONNX Runtime, CPU, RopeSP as an onnxruntime-extensions Python op), `aoti`
(AOTInductor packages, CPU or CUDA), `tensorrt` (engines on the executor's CUDA stream, torch-owned buffers
bound by address, execute_async_v3). On CUDA the chunk runs on the executor's own stream; with
`cuda_graphs` the whole chunk forward (engine calls, collectives, attention) is captured once per distinct
cache slot plan and replayed with its static inputs refreshed; the rolling-window copy stays outside.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ropesp.errors import EngineError, arg
from ropesp.manifest import Manifest, SegmentSpec
from ropesp.model.wan import CausalWanDiT
from ropesp.model.weights_file import read_header, read_safetensors
from ropesp.parallel import TokenShard
from ropesp.runtime.executor import ChunkExecutor
from ropesp.settings import ParallelConfig


# --- one segment, per backend: seg(*activations, *weights) -> [outputs] ------------------------
class OrtSegment:
    """An ONNX graph in ONNX Runtime on the CPU (float32: the RopeSP Python op's only dtype)."""

    def __init__(self, path: Path, spec: SegmentSpec) -> None:
        import onnxruntime as ort

        from ropesp.plugins.rope_sp_onnx import ort_session

        options = ort.SessionOptions()
        # one thread per rank: ORT's spinning worker pool competes for the same cores with torch's threads,
        # which run the attention and collectives between segments
        # (tiny preset, 1 rank, 2 shared cores, runs interleaved: 3.8-8.0 FPS with a pool as wide as torch's,
        # 9.5-55 FPS with one thread, faster in every pair)
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        try:
            self.session = ort_session(str(path), session_options=options)
        except Exception as exc:  # ONNX Runtime's own errors name neither the file nor the segment
            raise EngineError(
                f"engine file {path} is not a valid ONNX graph: {str(exc).splitlines()[0][:200]}"
            ) from None
        self.inputs = [t.name for t in spec.inputs]
        self.outputs = [t.name for t in spec.outputs]
        graph_in = [i.name for i in self.session.get_inputs()]
        graph_out = [o.name for o in self.session.get_outputs()]
        if sorted(graph_in) != sorted(self.inputs) or not set(self.outputs) <= set(graph_out):
            raise EngineError(
                f"engine file {path} is not the manifest's {spec.stem} segment: its inputs {graph_in} and outputs "
                f"{graph_out} differ from the manifest's {self.inputs} -> {self.outputs}; rebuild with `ropesp build`"
            )

    def __call__(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        feeds = {n: t.detach().contiguous().numpy() for n, t in zip(self.inputs, tensors, strict=True)}
        return [torch.from_numpy(a) for a in self.session.run(self.outputs, feeds)]


class AotiSegment:
    """An AOTInductor package (rope_sp: Triton kernel compiled in on CUDA, reference op on the CPU).

    Driven through the package loader itself (`boxed_run` on the flat tensors) rather than
    `torch._inductor.aoti_load_package`: that entry point first probes the host (Inductor compiles and
    dlopen-tests a C++ program per CPU vector ISA, each test a fresh Python process) only to log a warning
    on a mismatch, ~36 s of a 49 s engine cold start on the H200 host (bench/RESULTS.md), and its wrapper
    imports Inductor and Dynamo and rebuilds the call's pytree specs on every call. The manifest's own
    checks (GPU arch, torch version, digest of every file) run before any package loads."""

    MODEL_NAME = "model"  # aoti_compile_and_package's default name inside the archive

    def __init__(self, path: Path, device: torch.device, single_threaded: bool) -> None:
        if device.type == "cpu":
            import ropesp.plugins.rope_sp  # noqa: F401  (CPU packages call torch.ops.ropesp.rope_sp)

        index = device.index if device.type == "cuda" and device.index is not None else -1
        self.loader = torch._C._aoti.AOTIModelPackageLoader(
            str(path), self.MODEL_NAME, single_threaded, 1, index
        )

    def __call__(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        # compiled for the contiguous example strides; the segments' inputs and outputs are flat tensors
        return self.loader.boxed_run([t.contiguous() for t in tensors])


class TrtSegment:
    """A TensorRT engine; inputs and outputs are torch tensors bound by address, run on the current stream."""

    ALIGN = 256  # set_tensor_address needs 256-byte aligned buffers

    def __init__(self, path: Path, spec: SegmentSpec, device: torch.device) -> None:
        from ropesp.plugins.rope_sp_trt import register_trt_plugin

        register_trt_plugin()  # BackendUnavailableError without TensorRT; JIT-plugin engines need it
        import tensorrt as trt

        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))  # must outlive the engine
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise EngineError(f"TensorRT could not deserialize {path} (built by another TensorRT version?)")
        self.context = self.engine.create_execution_context()
        self.device = device
        self.inputs = spec.inputs
        self.outputs = [(t.name, tuple(t.shape), getattr(torch, t.dtype)) for t in spec.outputs]
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        want = {t.name for t in spec.inputs} | {n for n, _, _ in self.outputs}
        if names != want:
            raise EngineError(
                f"{path}: engine I/O {sorted(names)} differs from the manifest's {sorted(want)}"
            )

    def __call__(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        ctx = self.context
        for spec, t in zip(self.inputs, tensors, strict=True):
            if t.data_ptr() % self.ALIGN or not t.is_contiguous():
                t = t.clone(memory_format=torch.contiguous_format)  # fresh, aligned; freed in stream order
            if spec.dynamic:
                ctx.set_input_shape(spec.name, tuple(t.shape))
            ctx.set_tensor_address(spec.name, t.data_ptr())
        outs = [torch.empty(shape, dtype=dt, device=self.device) for _, shape, dt in self.outputs]
        for (name, _, _), t in zip(self.outputs, outs):
            ctx.set_tensor_address(name, t.data_ptr())
        if not ctx.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise EngineError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        return outs


# --- the executor ------------------------------------------------------------------------------
class EngineExecutor(ChunkExecutor):
    """Drives one rank's segments with SPState's runner, KV cache and collectives (Executor protocol)."""

    def __init__(
        self, manifest: Manifest, rank: int, segments: dict, model: CausalWanDiT, state, *, cuda_graphs: bool
    ) -> None:
        """segments: {chunk frames: {segment name: callable}}; model: the build's weights on this device
        (the text path, unpatchify, and the weight tensors every segment call binds)."""
        super().__init__(model, state, side_stream=True, cuda_graphs=cuda_graphs, rope="engine")
        self.manifest, self.segments = manifest, segments
        files, ft = manifest.rank_files(rank), manifest.geometry["frame_tokens"]
        self.frame_of_token = {  # chunk frames -> [L_local] int64, the frame of each of this rank's tokens
            f: CausalWanDiT.frame_index(
                files.first_token[str(f)], files.local_tokens[str(f)], f, ft, self.device
            )
            for f in manifest.frame_shapes
        }
        params = dict(model.named_parameters(remove_duplicate=False))  # stream blocks share tensors
        self.weights = {}  # (stream blocks?) -> {(segment name, frames, layer) -> [weights in input order]}
        for stream in (False, True) if model.stream_blocks is not None else (False,):
            weights = self.weights[stream] = {}
            for spec in manifest.segments:
                for layer in range(self.cfg.num_layers) if spec.per_layer else [None]:
                    scope = spec.weight_scope.format(layer=layer)
                    if stream and scope.startswith("blocks."):
                        scope = "stream_" + scope
                    weights[spec.name, spec.frames, layer] = [
                        params[scope + t.name] for t in spec.inputs if t.kind == "weight"
                    ]

    def _check_frames(self, frames: int) -> None:
        if frames not in self.segments:
            self.manifest.segment("embed", frames)  # raises EngineError naming the built chunk lengths

    def _inputs(self, x: torch.Tensor, t_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.to(self.device, self.dtype), t_sin.to(self.dtype)  # [B, F, C, H, W], [B, F, freq_dim]

    def _chunk(
        self, runner, frames: int, latents: torch.Tensor, t_sin: torch.Tensor, stream: bool
    ) -> torch.Tensor:
        """One chunk: the segments with the runner's shard / attention / gather between them."""
        seg, w, fot = self.segments[frames], self.weights[stream], self.frame_of_token[frames]
        g = self.manifest.geometry
        tokens, e, e0 = seg["embed"](latents, t_sin, *w["embed", frames, None])  # [B,L,C] [B,F,C] [B,F,6,C]
        x = runner.shard(tokens)  # [B, L_local, C]
        for layer, (cross_k, cross_v) in enumerate(self.cross_kv):
            q, k, v = seg["pre"](
                x, e0, self.state.start_frame, fot, *w["pre", frames, layer]
            )  # [B, L_local, H, D]
            o = runner.attention(layer, q, k, v)  # cache write + attention (+ all-to-alls)
            (x,) = seg["post"](x, o, e0, cross_k, cross_v, fot, *w["post", frames, layer])  # [B, L_local, C]
        (out,) = seg["head"](x, e, fot, *w["head", frames, None])  # [B, L_local, patch_out]
        out = runner.gather(out)  # [B, L, patch_out]
        return self.model.unpatchify(out.float(), frames, g["rows"], g["cols"])


# --- loading -----------------------------------------------------------------------------------
def _check_run(
    manifest: Manifest, state, mapping, backend: str, sp_rope: str, chunk_frames: Sequence[int]
) -> None:
    """Refuse (EngineError) a run the engines were not built for; manifest.validate did files/versions."""
    where = f"engine directory {manifest.root}"
    runtime_backend = manifest.backend_for_runtime()
    if backend != runtime_backend:
        raise EngineError(
            f"{where} holds {manifest.backend} artifacts, which {arg('backend', backend)} cannot run; "
            f"use {arg('backend', runtime_backend)}"
        )
    dtype = str(state.dtype).removeprefix("torch.")
    if dtype != manifest.dtype:
        raise EngineError(f"{where} was built for {arg('dtype', manifest.dtype)}; this run asks for {dtype}")
    if backend == "ort" and (state.device.type != "cpu" or dtype != "float32"):
        raise EngineError(
            f"{arg('backend', 'ort')} runs float32 graphs on the CPU: pass {arg('device', 'cpu')} and an fp32 build"
        )
    g, run = manifest.geometry, state.geometry
    if (run.latent_height, run.latent_width) != (g["latent_height"], g["latent_width"]):
        raise EngineError(
            f"{where} was built for latents {g['latent_height']}x{g['latent_width']}; this run asks for "
            f"{run.latent_height}x{run.latent_width}: rebuild for that size"
        )
    chunks = sorted(set(chunk_frames))
    if not set(chunks) <= set(manifest.frame_shapes):
        raise EngineError(
            f"{where} was built for chunks of {manifest.frame_shapes} latent frames; this run needs {chunks} "
            f"({arg('chunk_frames')} / {arg('independent_first_frame')}): rebuild with matching settings"
        )
    if sp_rope != "local":
        raise EngineError(f"{arg('sp_rope', sp_rope)} is an eager-only baseline; engines apply RoPE locally")
    files = manifest.rank_files(mapping.rank)
    for frames in manifest.frame_shapes:
        shard = TokenShard.split(frames * g["frame_tokens"], mapping.world_size, mapping.rank)
        built = (files.first_token[str(frames)], files.local_tokens[str(frames)])
        if (shard.first, shard.length) != built:
            raise EngineError(
                f"{where}: rank {mapping.rank} holds tokens {built}, the runtime splits {shard}"
            )


def load_weights(manifest: Manifest, device: torch.device) -> CausalWanDiT:
    """CausalWanDiT with the build's weights.safetensors on device (for the text path and the segments)."""
    with torch.device("meta"):
        model = CausalWanDiT(manifest.model_config())
    path = manifest.confined(manifest.weights)
    try:
        read_header(path)  # a file of the right digest may still be crafted: it must be safetensors
    except (ValueError, OSError) as exc:
        raise EngineError(f"engine file {path} is not a valid safetensors file: {exc}") from None
    if device.type == "cuda":
        state_dict = read_safetensors(path, device)  # parallel reads and copies (model/weights_file.py)
    else:
        from safetensors.torch import load_file

        state_dict = load_file(path)  # memory-mapped: pages are read as the segments first use them
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as exc:  # a manifest `model` edited away from the weights it lists
        lines = str(exc).strip().splitlines()
        why = lines[1].strip() if len(lines) > 1 else lines[0]
        why = why if len(why) <= 160 else why[:160] + " ..."
        raise EngineError(
            f"engine directory {manifest.root}: {manifest.weights} does not fit the manifest's model "
            f"({why}); rebuild with `ropesp build`"
        ) from None
    model.merge_stream_adapter()
    return model.eval().requires_grad_(False)


def load_engine_executor(
    manifest: Manifest,
    state,
    mapping,
    *,
    backend: str,
    parallel: ParallelConfig,
    chunk_frames: Sequence[int],
    cuda_graphs: bool = True,
) -> EngineExecutor:
    """The executor of this rank for the engines of `manifest` (Manifest.load of a `ropesp build`
    directory), run by `backend` (ort | aoti | tensorrt) on state's device and geometry; validated
    first against the run: the world and rank of mapping, parallel's SP modes, the chunk sizes
    chunk_frames (latent frames) it will be asked for. cuda_graphs: capture chunks (on CUDA only)."""
    # every package's digest is checked before it loads; the weights' (the largest file, data only) is
    # hashed while they load
    manifest.validate(
        world_size=mapping.world_size, rank=mapping.rank, device=state.device, weights_digest=False
    )
    _check_run(manifest, state, mapping, backend, parallel.sp_rope, chunk_frames)
    files = manifest.rank_files(mapping.rank).files
    cuda_graphs = cuda_graphs and state.device.type == "cuda"
    segments: dict[int, dict] = {}
    for spec in manifest.segments:
        path = manifest.confined(files[spec.stem])  # listed, verified by validate, inside the directory
        if backend == "ort":
            seg = OrtSegment(path, spec)
        elif backend == "aoti":
            seg = AotiSegment(path, state.device, single_threaded=cuda_graphs)
        else:
            seg = TrtSegment(path, spec, state.device)
        segments.setdefault(spec.frames, {})[spec.name] = seg
    with ThreadPoolExecutor(max_workers=1) as pool:
        weights_checked = pool.submit(manifest.verify_files, mapping.rank, code=False)
        try:
            model = load_weights(manifest, state.device)
        except Exception:
            weights_checked.result()  # a modified weights file is the cause: its digest error says so
            raise
        weights_checked.result()
    return EngineExecutor(manifest, mapping.rank, segments, model, state, cuda_graphs=cuda_graphs)

"""Command line: argparse -> dataclasses -> one function call per subcommand.

ropesp generate   stream a video from the eager model or built engines
ropesp build      export engines (ONNX / TensorRT / AOTInductor) for a world size
ropesp bench      measure the optimized path against the baselines side by side
ropesp serve-repo write a Triton Inference Server model repository
ropesp serve      start tritonserver on a repository
ropesp demo       a web page that shows a stream as it is generated
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ropesp import start_gc
from ropesp.config import PRESETS, SamplerConfig, latent_frames_for
from ropesp.errors import CheckpointError, ConfigError, RopespError
from ropesp.extras import require, require_backend
from ropesp.video import OutputPaths, check_outputs, import_writer_in_background

if TYPE_CHECKING:  # torch is imported by the commands that use it: the parser and --help stay quick
    import torch


def _steps(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--steps {text!r}: expected comma-separated integers in 1..1000, descending (e.g. 1000,750,500,250)"
        ) from None
    try:
        SamplerConfig(steps=values)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return values


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--checkpoint", help="Self-Forcing .pt, Wan .safetensors (file, index or dir), diffusers dir"
    )
    src = g.add_mutually_exclusive_group()
    src.add_argument("--model-config", help="Wan config.json (when the checkpoint has none beside it)")
    src.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="named model (random weights without --checkpoint); default: the embedded trained demo model",
    )


def add_video_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("video")
    g.add_argument("--latent-height", type=int)
    g.add_argument("--latent-width", type=int)
    g.add_argument("--height", type=int, help="pixels (multiple of 16); latent = pixels / 8")
    g.add_argument("--width", type=int, help="pixels (multiple of 16); latent = pixels / 8")
    g.add_argument("--latent-frames", type=int)
    g.add_argument(
        "--frames",
        type=int,
        help="video frames N = 4*latent_frames - 3; generate: 0 streams until Ctrl-C (needs --local-attn-frames)",
    )
    g.add_argument("--chunk-frames", type=int, default=3)
    g.add_argument("--independent-first-frame", action="store_true")
    g.add_argument("--max-frames", type=int, help="KV cache capacity in frames (default: the video)")
    g.add_argument("--local-attn-frames", type=int, default=-1, help="rolling window, sink frames included")
    g.add_argument("--sink-frames", type=int, default=0)


def add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--device", choices=["cuda", "cpu"])
    g.add_argument("--world-size", type=int, help="sequence-parallel ranks (spawned locally unless torchrun)")
    g.add_argument(
        "--sp-rope",
        choices=["local", "allgather"],
        default="local",
        help="local = Causal-RoPE SP; allgather = the paper's baseline",
    )
    g.add_argument(
        "--sp-comm",
        choices=["fused", "unfused"],
        default="fused",
        help="fused = one all-to-all for q,k,v; unfused = three",
    )
    g.add_argument(
        "--ulysses-degree", type=int, help="U of the hybrid layout world = U x R (default: largest fit)"
    )
    g.add_argument(
        "--ring-degree", type=int, help="R of the hybrid layout (ring attention over cache shards)"
    )
    g.add_argument(
        "--backend",
        choices=["eager", "compile", "ort", "aoti", "tensorrt"],
        help="eager (default) | compile: regional torch.compile + CUDA graphs | engines of `ropesp build`",
    )
    g.add_argument("--engines", help="engine directory from `ropesp build`")
    g.add_argument("--no-cuda-graphs", action="store_true")
    g.add_argument(
        "--precision",
        choices=["bf16", "fp8", "fp8-ffn"],
        default="bf16",
        help="fp8: the blocks' Linear layers as e4m3 GEMMs (torchao; eager/compile, CUDA >= sm_89); "
        "fp8-ffn: the FFN's only",
    )
    g.add_argument(
        "--attention",
        choices=["sdpa", "fa3", "fp8", "int8"],
        default="sdpa",
        help="self-attention over the KV cache: sdpa (bf16 cuDNN, default) | fa3 (FlashAttention-3 bf16) | "
        "fp8 (FlashAttention-3 e4m3 over an e4m3 KV cache) | int8 (SageAttention)",
    )
    g.add_argument(
        "--collective-timeout",
        type=float,
        metavar="SECONDS",
        help="while streaming, how long a rank waits for the others before the run stops and names the "
        "stalled rank (default 60; --backend compile: 300, its graphs compile during the first chunks; "
        "setup before the first chunk may take longer)",
    )


def _latent_sizes(args) -> tuple[int | None, int | None, int | None]:
    lh, lw, lf = args.latent_height, args.latent_width, args.latent_frames
    if args.height is not None or args.width is not None:
        if lh is not None or lw is not None:
            raise ConfigError(
                "give either --height/--width (pixels) or --latent-height/--latent-width, not both"
            )
        for name, px in (("--height", args.height), ("--width", args.width)):
            if px is None or px < 16 or px % 16:
                raise ConfigError(f"{name} {px} must be a positive multiple of 16 pixels (both are needed)")
        lh, lw = args.height // 8, args.width // 8
    if args.frames is not None:
        if lf is not None:
            raise ConfigError("give either --frames or --latent-frames, not both")
        lf = 0 if args.frames == 0 else latent_frames_for(args.frames)
    if lf == 0:  # an unbounded stream (generate only); the config keeps its default length
        lf = None
    return lh, lw, lf


def _default_checkpoint(args) -> str | None:
    """The embedded demo weights when nothing names a model (no --checkpoint, --model-config, --preset,
    --engines or --model-dir); random-weight presets stay available by name."""
    named = ("checkpoint", "model_config", "preset", "engines", "model_dir")
    if any(getattr(args, name, None) for name in named):
        return None
    from ropesp.demo import default_checkpoint, has_default_weights

    return str(default_checkpoint()) if has_default_weights() else None


def pipeline_config(args, *, unbounded_ok: bool = False, demo_default: bool = False):
    """The PipelineConfig of the parsed flags; demo_default: without a named model, the embedded demo
    weights (generate, serve-repo) instead of the random-weight default preset (bench); unbounded_ok:
    `--frames 0` (a stream until Ctrl-C) is accepted (generate)."""
    from ropesp.runtime.pipeline import PipelineConfig

    if not unbounded_ok and 0 in (args.frames, args.latent_frames):
        raise ConfigError("--frames 0 (a stream until Ctrl-C) is for `ropesp generate`; give a length here")
    lh, lw, lf = _latent_sizes(args)
    sampler = SamplerConfig(
        steps=getattr(args, "steps", SamplerConfig.steps),
        shift=getattr(args, "shift", SamplerConfig.shift),
        chunk_frames=args.chunk_frames,
        independent_first_frame=args.independent_first_frame,
    )
    return PipelineConfig(
        checkpoint=args.checkpoint or (_default_checkpoint(args) if demo_default else None),
        model_config=args.model_config,
        preset=args.preset,
        engines=args.engines,
        backend=args.backend,
        latent_height=lh,
        latent_width=lw,
        latent_frames=lf,
        sampler=sampler,
        max_frames=args.max_frames,
        local_attn_frames=args.local_attn_frames,
        sink_frames=args.sink_frames,
        dtype=args.dtype,
        device=args.device,
        world_size=args.world_size,
        sp_rope=args.sp_rope,
        sp_comm=args.sp_comm,
        cuda_graphs=not args.no_cuda_graphs,
        ulysses_degree=args.ulysses_degree,
        ring_degree=args.ring_degree,
        precision=args.precision,
        attention=args.attention,
        collective_timeout_s=args.collective_timeout,
    )


# --- generate ------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerateOutputs:
    seed: int
    paths: OutputPaths
    """Checked --output / --latents-out / --frames-dir."""
    decoder: str = "preview"
    """preview | vae"""
    vae: str | None = None
    """Wan VAE (diffusers vae/ directory or Wan2.1_VAE.pth) for decoder 'vae'."""
    vae_flag: str = "--vae"
    """Where the VAE came from, for error messages."""
    overlap_decode: bool | None = None
    """None: decode overlapped with the DiT on CUDA; False: serial."""
    vae_compile: bool = False
    """Run the Wan VAE decoder through torch.compile."""
    decode_device: str | None = None
    """Where rank 0's Wan VAE decodes (cuda:N); None = rank 0's own device."""
    unbounded: bool = False
    """Stream until Ctrl-C (--frames 0)."""


def add_model_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model-dir",
        help="diffusers Wan2.1 directory (transformer/, vae/, text_encoder/, tokenizer/); "
        "--checkpoint overrides transformer/",
    )


def model_dir_of(args):
    """The resolved --model-dir (CheckpointError for a wrong or partial one), or None."""
    if not getattr(args, "model_dir", None):
        return None
    from ropesp.model_dir import resolve_model_dir

    return resolve_model_dir(args.model_dir, args.checkpoint)


def _encode_prompts(choice, res, mapping, texts: list[str]) -> list[torch.Tensor]:
    """Texts through the chosen umT5 (runtime.prompts.text_encoder_for) on this rank's device, then freed."""
    from ropesp.runtime.dist import device_for

    device = device_for(mapping, res.device)

    def announce(model_dir) -> None:
        print(f"ropesp: encoding the prompt with umT5 from {model_dir} on {device}", file=sys.stderr)

    t0 = time.perf_counter()
    encoder = choice.load(res.model, res.dtype, device, announce)
    try:
        prompts = [encoder.encode(text) for text in texts]
    finally:
        del encoder
        if device.type == "cuda":
            import torch

            torch.cuda.empty_cache()
    n = f"{len(texts)} prompts" if len(texts) > 1 else "the prompt"
    print(f"encoded {n} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return prompts


def _prompt_changes(args) -> list[tuple[int, str]]:
    """--prompt-at CHUNK PROMPT pairs, checked: chunk indices >= 1, each once, in order."""
    changes = []
    for chunk, value in args.prompt_at or []:
        try:
            k = int(chunk)
        except ValueError:
            raise ConfigError(f"--prompt-at {chunk!r} {value!r}: CHUNK must be an integer >= 1") from None
        if k < 1:
            raise ConfigError(f"--prompt-at {k}: CHUNK must be >= 1 (chunk 0 takes --prompt/--prompt-embeds)")
        changes.append((k, value))
    chunks = [k for k, _ in changes]
    if len(set(chunks)) != len(chunks):
        raise ConfigError(f"--prompt-at chunks {chunks}: each chunk may change the prompt once")
    return sorted(changes)


def _prompt_schedule(args, md, res, session_chunks: int | None, mapping):
    """The stream's PromptSchedule from --prompt/--prompt-embeds and --prompt-at (same kind as the first);
    texts are encoded on this rank's (mapping's) device."""
    from ropesp.runtime.executor import check_prompt_embeds
    from ropesp.runtime.generate import PromptSchedule
    from ropesp.runtime.prompts import default_prompt_embeds, load_prompt_embeds, text_encoder_for

    changes = _prompt_changes(args)
    if session_chunks is not None and changes and changes[-1][0] >= session_chunks:
        raise ConfigError(
            f"--prompt-at {changes[-1][0]}: the video has {session_chunks} chunks (0..{session_chunks - 1})"
        )
    from ropesp.demo import DEFAULT_PROMPT, own_text_encoder

    choice = text_encoder_for(args.text_encoder, md, own_text_encoder(res.model))
    if args.prompt is not None and choice is None:
        raise ConfigError(
            "--prompt needs a text encoder: pass --text-encoder DIR (umT5: text_encoder/ + tokenizer/) or "
            "--model-dir DIR, or give --prompt-embeds PATH instead"
        )
    if choice is not None and choice.builtin and not args.prompt_embeds:  # no download
        texts = [DEFAULT_PROMPT if args.prompt is None else args.prompt, *(v for _, v in changes)]
        embeds = [choice.encoder.encode(text) for text in texts]
        print(f"ropesp: prompt {texts[0]!r} (demo encoder)", file=sys.stderr)
    elif args.prompt is not None:
        embeds = _encode_prompts(choice, res, mapping, [args.prompt, *(v for _, v in changes)])
    elif args.prompt_embeds:
        embeds = [load_prompt_embeds(args.prompt_embeds)]
        embeds += [load_prompt_embeds(v, f"--prompt-at {k}") for k, v in changes]
    else:
        if changes:
            raise ConfigError("--prompt-at needs --prompt TEXT or --prompt-embeds PATH for the first chunk")
        embeds = [default_prompt_embeds(res.model)]
    for e in embeds:
        check_prompt_embeds(res.model, e)
    later = tuple((k, e) for (k, _), e in zip(changes, embeds[1:], strict=True))
    return PromptSchedule(embeds[0], later, args.prompt_mode)


def cmd_generate(args) -> None:
    import dataclasses
    from pathlib import Path

    from ropesp.decode.factory import check_wan_vae_options
    from ropesp.limits import check_local_ranks
    from ropesp.run_status import announce
    from ropesp.runtime.dist import parse_device
    from ropesp.runtime.launch import spawn_ranks, under_launcher
    from ropesp.runtime.session import check_unbounded

    if args.text_encoder and args.prompt is None:
        raise ConfigError("--text-encoder is only used with --prompt TEXT")
    if args.vae and not Path(args.vae).exists():
        raise ConfigError(f"--vae {args.vae} does not exist (a diffusers vae/ directory or Wan2.1_VAE.pth)")
    md = model_dir_of(args)
    vae = args.vae or (str(md.vae) if md is not None else None)
    decoder = args.decoder or ("vae" if vae else "preview")
    if decoder == "vae" and vae is None:
        raise ConfigError(
            "--decoder vae needs a Wan VAE: pass --vae PATH (diffusers vae/ directory or Wan2.1_VAE.pth) "
            "or --model-dir DIR, or use --decoder preview"
        )
    check_wan_vae_options(
        decoder == "vae",
        args.vae_compile,
        args.decode_device,
        "use it with --decoder vae (--vae or --model-dir)",
    )
    if args.decode_device:
        parse_device(args.decode_device, "--decode-device")
    config = pipeline_config(args, unbounded_ok=True, demo_default=True)
    if md is not None:
        config = dataclasses.replace(config, checkpoint=str(md.dit_weights))
    try:
        # this process's place in the group: read from the launcher's environment once, passed down
        res, mapping = config.resolve_rank()
    except CheckpointError as exc:
        if md is None or args.checkpoint:
            raise
        raise CheckpointError(f"--model-dir {md.root} (transformer/): {exc}") from None
    # before any work (prompt encoding, model loading): a bad path must not cost a whole video
    paths = check_outputs(
        args.output or f"ropesp-{args.seed}.mp4", args.latents_out, args.frames_dir, args.overwrite
    )
    require_backend(res.backend)
    if decoder == "vae":
        require("vae", "--decoder vae (the Wan VAE)")
    unbounded = 0 in (args.frames, args.latent_frames)
    if unbounded:
        check_unbounded(res.cache)
    chunks = None if unbounded else len(res.request.sampler.chunk_sizes(res.latent_frames))
    if res.world_size > 1 and not under_launcher():
        check_local_ranks(res.world_size, res.device)  # before the prompt is encoded
    prompts = _prompt_schedule(args, md, res, chunks, mapping)
    if res.request.checkpoint and args.checkpoint is None and md is None:
        print(
            f"ropesp: no --checkpoint given: running the embedded demo model ({res.request.checkpoint})",
            file=sys.stderr,
        )
    if res.random_weights:
        name = args.preset or "tiny"
        print(
            f"ropesp: no --checkpoint given: running the {name!r} preset on seeded random weights",
            file=sys.stderr,
        )
    outputs = GenerateOutputs(
        args.seed,
        paths,
        decoder=decoder,
        vae=vae if decoder == "vae" else None,
        vae_flag="--vae" if args.vae else f"--model-dir {args.model_dir}",
        overlap_decode=False if args.no_overlap_decode else None,
        vae_compile=args.vae_compile,
        decode_device=args.decode_device,
        unbounded=unbounded,
    )
    if mapping.is_first:
        announce(res, sys.stderr)
    # an unbounded stream ends on Ctrl-C: only rank 0 takes it (and tells the others at a chunk boundary)
    ignore = signal.signal(signal.SIGINT, signal.SIG_IGN) if unbounded and res.world_size > 1 else None
    try:
        if res.world_size > 1 and not under_launcher():
            spawn_ranks(res.world_size, _generate_rank, res, prompts, outputs)
        else:
            _generate_rank(mapping, res, prompts, outputs)
    finally:
        if ignore is not None:
            signal.signal(signal.SIGINT, ignore)


def _lead_decoder(res, outputs: GenerateOutputs, device: torch.device):
    """Rank 0's decoder: the preview on its GPU, or the Wan VAE there or on --decode-device; a compiled
    one is built before the first chunk, not in the middle of the stream."""
    from ropesp.runtime.pipeline import lead_decoder

    if outputs.decoder != "vae":
        return lead_decoder(res, None, device)
    if outputs.vae_compile:
        print("loading and compiling the Wan VAE decoder (once per process) ...", file=sys.stderr)
    t0 = time.perf_counter()
    try:
        decoder = lead_decoder(
            res, outputs.vae, device, compile=outputs.vae_compile, decode_device=outputs.decode_device
        )
    except CheckpointError as exc:
        raise CheckpointError(f"{outputs.vae_flag}: {exc}") from None
    if outputs.vae_compile:
        print(f"compiled the decoder in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return decoder


class _StopOnInterrupt:
    """Rank 0 of an unbounded stream: Ctrl-C asks the stream to end after the current chunk."""

    def __init__(self) -> None:
        self.asked = False

    def __enter__(self) -> _StopOnInterrupt:
        self.previous = signal.signal(signal.SIGINT, self._ask)
        return self

    def _ask(self, *_) -> None:
        if self.asked:  # a second Ctrl-C: now
            raise KeyboardInterrupt
        self.asked = True
        print("\nropesp: stopping after this chunk (Ctrl-C again to abort)", file=sys.stderr)

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self.previous)


def _generate_rank(mapping, res, prompts, outputs: GenerateOutputs) -> None:
    from tqdm import tqdm

    from ropesp.decode import video_frames_for
    from ropesp.runtime.generate import rank_session, write_video

    lead = mapping.is_first
    if lead:
        import_writer_in_background()  # while the session builds
    with rank_session(
        mapping,
        res,
        lambda device: _lead_decoder(res, outputs, device),
        overlap_decode=outputs.overlap_decode,
        decode_device=outputs.decode_device,
        unbounded=outputs.unbounded,
    ) as session:
        if lead:
            mode = "overlapped with the DiT" if session.overlapped else "after each chunk"
            on = f" on {outputs.decode_device}" if outputs.decode_device else ""
            print(f"decoder: {outputs.decoder}{on} ({mode})", file=sys.stderr)
            if outputs.unbounded:
                print("streaming until Ctrl-C", file=sys.stderr)
        total = None if session.chunk_sizes is None else len(session.chunk_sizes)
        bars = []

        def start(part_path) -> None:
            if part_path is not None:
                print(f"writing {part_path} (playable while written)", file=sys.stderr)
            bars.append(tqdm(total=total, desc="chunks", unit="chunk", disable=not lead, file=sys.stderr))

        interrupt = _StopOnInterrupt() if outputs.unbounded and lead else contextlib.nullcontext()
        with interrupt:
            result = write_video(
                session,
                prompts,
                outputs.seed,
                outputs.paths if lead else None,
                lambda _: bars[0].update(1),
                on_start=start,
                stop=lambda: bool(getattr(interrupt, "asked", False)),
            )
        bars[0].close()
        if not lead:
            return
        paths = outputs.paths
        total_s = result.total_ms / 1e3
        frames = video_frames_for(result.latent_frames)
        print(f"time to first chunk: {result.first_chunk_ms:.1f} ms", file=sys.stderr)
        print(
            f"generated {frames} frames ({result.latent_frames} latent) in {total_s:.2f} s: "
            f"{frames / total_s:.1f} FPS ({outputs.decoder} decode included)",
            file=sys.stderr,
        )
        print(f"wrote {paths.video}", file=sys.stderr)
        if paths.latents:
            print(f"wrote {paths.latents}", file=sys.stderr)
        if paths.frames_dir:
            print(f"wrote {frames} PNG frames to {paths.frames_dir}", file=sys.stderr)


# --- bench ---------------------------------------------------------------------------------
def cmd_bench(args) -> None:
    from ropesp.bench import BenchConfig, run
    from ropesp.runtime.prompts import default_prompt_embeds

    bench = BenchConfig(
        pipeline=pipeline_config(args),
        configs=tuple(c for c in args.configs.split(",") if c),
        warmup=args.warmup,
        repeat=args.repeat,
        vae=args.vae,
        vae_compile=args.vae_compile,
        decode_device=args.decode_device,
        decode=not args.no_decode,
        commit=args.commit,
        alone=args.alone,
        json_out=args.json,
        plot_out=args.plot,
        command="ropesp " + " ".join(sys.argv[1:]),
    )
    res, mapping = bench.pipeline.resolve_rank()
    if args.plot:
        require("bench", "--plot")
    require_backend(res.backend)
    run(bench, default_prompt_embeds(res.model), (res, mapping))


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="time the optimized path against the baselines in one run")
    add_model_args(p)
    add_video_args(p)
    add_run_args(p)
    p.add_argument(
        "--configs",
        default="reference,paper-sp,optimized",
        help="comma-separated: reference, paper-sp, optimized, optimized-graphs, compile, compile-fa3, "
        "compile-fp8, compile-fp8attn, compile-int8attn, compiled-nograph, compiled",
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed videos per configuration")
    p.add_argument("--repeat", type=int, default=2, help="timed videos per configuration (median)")
    p.add_argument(
        "--vae", help="time decode with the Wan VAE: a checkpoint, or 'random' (full size, random weights)"
    )
    p.add_argument("--vae-compile", action="store_true", help="torch.compile the Wan VAE decoder")
    p.add_argument(
        "--decode-device",
        help="rank 0 decodes on this device (cuda:N, e.g. a GPU beside the DiT ranks'); default: rank 0's GPU",
    )
    p.add_argument("--no-decode", action="store_true", help="time the DiT only (skip the runs with decode)")
    p.add_argument(
        "--alone",
        action="store_true",
        help="run rank 0 of the --world-size group by itself on one GPU, its collectives moving no data: "
        "one rank's compute at that world size (the scaling free communication would give); outputs are wrong",
    )
    p.add_argument("--commit", help="source commit to record when the tree has no git metadata")
    p.add_argument("--json", help="write the results as JSON")
    p.add_argument("--plot", help="write a PNG plot")
    p.set_defaults(func=cmd_bench)


# --- serve-repo / serve --------------------------------------------------------------------
def cmd_serve_repo(args) -> None:
    from ropesp.serving.repository import write_repository

    if args.vae and args.decoder != "vae":
        raise ConfigError("--vae is only used with --decoder vae")
    model_dir = write_repository(
        args.out,
        pipeline_config(args, demo_default=True),
        args.world_size,
        decoder=args.decoder,
        vae=args.vae,
        vae_compile=args.vae_compile,
        decode_device=args.decode_device,
        model_name=args.model_name,
        link=args.link,
        overwrite=args.force,
    )
    print(f"wrote {model_dir}; serve it with: ropesp serve --repo {args.out}", file=sys.stderr)


def cmd_serve(args) -> None:
    from ropesp.serving.server import TritonServer

    server = TritonServer(
        args.repo, http_port=args.http_port, grpc_port=args.grpc_port, ready_timeout_s=args.timeout
    )
    try:
        with server:  # stopped on the way out: SIGINT and SIGTERM raise KeyboardInterrupt in here
            print(
                f"tritonserver ready: HTTP {server.http_url}, gRPC {server.grpc_url} (log {server.log_path}); "
                "Ctrl-C stops it",
                file=sys.stderr,
            )
            server.wait()
    except KeyboardInterrupt:
        print("tritonserver stopped", file=sys.stderr)


def add_serve_parsers(sub) -> None:
    p = sub.add_parser("serve-repo", help="write a Triton Inference Server model repository (streaming)")
    add_model_args(p)
    add_video_args(p)
    add_run_args(p)
    p.add_argument("--out", required=True, help="repository directory (the model goes to OUT/<model-name>)")
    p.add_argument("--model-name", default="ropesp")
    p.add_argument("--decoder", choices=["preview", "vae"], default="preview", help="how frames are decoded")
    p.add_argument("--vae", help="Wan VAE for --decoder vae (diffusers vae/ directory or Wan2.1_VAE.pth)")
    p.add_argument(
        "--vae-compile", action="store_true", help="torch.compile the Wan VAE decoder (at model load)"
    )
    p.add_argument("--decode-device", help="run the Wan VAE on this device (cuda:N) instead of rank 0's")
    p.add_argument("--shift", type=float, default=5.0)
    p.add_argument("--steps", type=_steps, default=(1000, 750, 500, 250), help="e.g. 1000,750,500,250")
    p.add_argument("--link", action="store_true", help="symlink artifacts, not copies (not relocatable)")
    p.add_argument("--force", action="store_true", help="replace an existing model directory")
    p.set_defaults(func=cmd_serve_repo)

    p = sub.add_parser("serve", help="run tritonserver (from nvidia-pytriton) on a repository, on 127.0.0.1")
    p.add_argument("--repo", required=True, help="model repository from `ropesp serve-repo`")
    p.add_argument("--http-port", type=int, help="default: a free port")
    p.add_argument("--grpc-port", type=int, help="default: a free port")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the server to be ready")
    p.set_defaults(func=cmd_serve)


# --- demo ----------------------------------------------------------------------------------
def cmd_demo(args) -> None:
    from ropesp.webdemo import check_demo_dependencies

    check_demo_dependencies()  # before the model is built
    from ropesp.webdemo.command import run

    run(args)


def add_demo_parser(sub) -> None:
    from ropesp.webdemo.command import add_arguments

    p = sub.add_parser(
        "demo",
        help="web page streaming generated frames live (needs the [demo] extra: pip install -e '.[demo]')",
    )
    add_model_args(p)
    add_arguments(p)
    p.set_defaults(func=cmd_demo)


# --- build ---------------------------------------------------------------------------------
def cmd_build(args) -> None:
    from ropesp.export.build import BuildConfig, build

    if args.backend in ("onnx", "tensorrt"):  # TensorRT engines are built from the ONNX graphs
        require("onnx", f"--backend {args.backend}")
    if args.backend == "tensorrt":
        from ropesp.export import tensorrt as trt_build

        trt_build.require()  # TensorRT's own message: how to get it, and --backend aoti meanwhile
    build(
        BuildConfig(
            out=args.out,
            backend=args.backend,
            world_size=args.world_size,
            checkpoint=args.checkpoint,
            model_config=args.model_config,
            preset=args.preset,
            latent_height=args.latent_height,
            latent_width=args.latent_width,
            chunk_frames=args.chunk_frames,
            independent_first_frame=args.independent_first_frame,
            max_frames=args.max_frames,
            local_attn_frames=args.local_attn_frames,
            sink_frames=args.sink_frames,
            dtype=args.dtype,
            device=args.device,
            autotune=args.autotune,
            overwrite=args.overwrite,
        )
    )


def add_build_parser(sub) -> None:
    p = sub.add_parser("build", help="export engines (ONNX / TensorRT / AOTInductor) for one world size")
    add_model_args(p)
    g = p.add_argument_group("engines")
    g.add_argument("--backend", required=True, choices=["onnx", "tensorrt", "aoti"])
    g.add_argument(
        "--out", required=True, help="engine directory to write (manifest.json + rank*/): new or empty"
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the previous ropesp build in --out (only the files its manifest lists)",
    )
    g.add_argument("--world-size", type=int, default=1, help="sequence-parallel ranks the engines are for")
    g.add_argument("--latent-height", type=int, help="latent height (default: the preset's)")
    g.add_argument("--latent-width", type=int, help="latent width (default: the preset's)")
    g.add_argument("--chunk-frames", type=int, default=3)
    g.add_argument(
        "--independent-first-frame", action="store_true", help="also build the 1-frame first chunk"
    )
    window = g.add_mutually_exclusive_group()
    window.add_argument("--max-frames", type=int, help="default video length / KV cache frames")
    window.add_argument(
        "--local-attn-frames", type=int, default=-1, help="rolling window, sink frames included"
    )
    g.add_argument("--sink-frames", type=int, default=0)
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    g.add_argument(
        "--device", choices=["cpu", "cuda"], help="where the engines run (default: cuda for tensorrt)"
    )
    g.add_argument("--autotune", action="store_true", help="AOTInductor max-autotune on CUDA (slower build)")
    p.set_defaults(func=cmd_build)


# --- parser --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ropesp", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="stream a video chunk by chunk")
    add_model_args(gen)
    add_video_args(gen)
    add_run_args(gen)
    add_model_dir_arg(gen)
    text = gen.add_mutually_exclusive_group()
    text.add_argument(
        "--prompt",
        help="text prompt, encoded once by umT5 (--text-encoder or --model-dir); the demo model has its own "
        "encoder (e.g. 'a red square moving right')",
    )
    text.add_argument("--prompt-embeds", help=".pt tensor [L, text_dim] / [1, L, text_dim] or .safetensors")
    gen.add_argument(
        "--prompt-at",
        nargs=2,
        action="append",
        metavar=("CHUNK", "PROMPT"),
        help="from chunk CHUNK (>= 1; chunks of --chunk-frames latent frames, 0 is the first) on, use PROMPT: "
        "text with --prompt, an embeddings file with --prompt-embeds; repeat for a schedule, e.g. "
        '--prompt "a fox" --prompt-at 4 "the fox jumps" --prompt-at 8 "the fox sleeps"',
    )
    gen.add_argument(
        "--prompt-mode",
        choices=["swap", "recache"],
        default="swap",
        help="how --prompt-at changes apply: swap = the cross-attention K/V only; recache = also recompute "
        "the self-attention cache of the frames in the window under the new prompt (one forward per cached chunk)",
    )
    gen.add_argument("--text-encoder", help="umT5 directory: text_encoder/ + tokenizer/, or one HF directory")
    gen.add_argument(
        "--decoder",
        choices=["preview", "vae"],
        help="vae: streaming Wan VAE (default when --vae or --model-dir gives one); preview: fast linear map",
    )
    gen.add_argument(
        "--vae", help="Wan VAE: diffusers vae/ directory or Wan2.1_VAE.pth (default: --model-dir's)"
    )
    gen.add_argument(
        "--vae-compile",
        action="store_true",
        help="torch.compile the Wan VAE decoder: ~2 min of compilation per process, then about 1.7x faster "
        "decode than the default (channels-last) on an H200",
    )
    gen.add_argument(
        "--decode-device",
        help="run the Wan VAE on this device (cuda:N), e.g. a GPU of its own beside the DiT's, so decode "
        "does not take the DiT's SMs (default: rank 0's GPU)",
    )
    gen.add_argument(
        "--no-overlap-decode",
        action="store_true",
        help="decode each chunk after its DiT instead of concurrently with the next chunk's (default on GPU)",
    )
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--shift", type=float, default=5.0)
    gen.add_argument(
        "--steps",
        type=_steps,
        default=(1000, 750, 500, 250),
        help="denoising steps before warping, e.g. 1000,750,500,250",
    )
    gen.add_argument("--latents-out", help="write the final latents [B, F, C, H, W] with torch.save")
    gen.add_argument(
        "--output",
        help="MP4 path (default ropesp-<seed>.mp4): a fragmented MP4, written as OUTPUT.<random>.part "
        "(playable while written) and renamed when the run succeeds",
    )
    gen.add_argument("--frames-dir", help="also write each frame as DIR/frame_NNNNNN.png as it arrives")
    gen.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --output/--latents-out (only when the run succeeds) and delete old "
        "frame_*.png in --frames-dir",
    )
    gen.set_defaults(func=cmd_generate)
    add_bench_parser(sub)
    add_serve_parsers(sub)
    add_build_parser(sub)
    add_demo_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.func is cmd_generate:  # until its first chunk (the runtime releases it): ropesp/start_gc.py
        start_gc.hold()
    try:
        args.func(args)
    except RopespError as exc:
        print(f"ropesp: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C or SIGINT: every rank was stopped on the way out
        print("ropesp: interrupted", file=sys.stderr)
        return 130
    finally:
        start_gc.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())

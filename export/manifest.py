"""manifest.json of an engine directory: what was built, for which setup, and every file's SHA-256.

Standard library only at import time: the runtime reads engine directories through this module and
never imports a builder. Layout written by `ropesp build` (export/build.py):

    DIR/manifest.json
    DIR/weights.safetensors            every segment takes weights as inputs; shared by all ranks
    DIR/rank{r}/{segment}.onnx|.pt2|.engine   (+ `{segment}_f{F}.*` for an extra chunk length F)

`Manifest.validate` refuses, with `EngineError` and what to do about it, an engine directory that does
not fit the run: another world size, a missing or modified file, another GPU architecture, another
torch (AOTInductor) or TensorRT version, an unknown backend or format.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ropesp.errors import EngineError, arg

FORMAT = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
RUNTIME_BACKENDS = {"onnx": "ort", "aoti": "aoti", "tensorrt": "tensorrt"}
"""Build backend -> the `generate --backend` that runs it."""
EXTENSIONS = {"onnx": ".onnx", "aoti": ".pt2", "tensorrt": ".engine"}
PINNED_VERSIONS = {"aoti": ("torch", "AOTInductor packages"), "tensorrt": ("tensorrt", "TensorRT engines")}
"""Build backend -> (package, what) whose exact version the artifacts need; ONNX graphs are portable."""


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a segment."""

    name: str
    """Graph input/output name (weights: the parameter name inside `weight_scope`)."""
    dtype: str
    """float32 | bfloat16 | float16 | int32."""
    shape: list[int]
    """Static shape (the shape built for; see `dynamic`)."""
    kind: str = "activation"
    """activation | weight."""
    dynamic: dict[str, list[int]] = field(default_factory=dict)
    """Dims that vary: {"dim index": [min, opt, max]}; empty = static (every segment so far)."""


@dataclass(frozen=True)
class SegmentSpec:
    """One traced segment of the DiT (export/segments.py) at one chunk length."""

    name: str
    """embed | pre | post | head."""
    frames: int
    """Latent frames of the chunk this segment was traced for."""
    stem: str
    """File stem inside rank{r}/ (e.g. "pre", "pre_f1")."""
    inputs: list[TensorSpec]
    """Activations first, then weights, in call order."""
    outputs: list[TensorSpec]
    weight_scope: str
    """Prefix of the weights in weights.safetensors: "", "head." or "blocks.{layer}." (per layer)."""

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.weight_scope


@dataclass(frozen=True)
class RankFiles:
    """What rank r loads."""

    rank: int
    files: dict[str, str]
    """Segment stem -> path relative to the engine directory."""
    first_token: dict[str, int]
    """Chunk frames (as a string) -> this rank's first token index (the RoPE-SP attribute)."""
    local_tokens: dict[str, int]
    """Chunk frames -> L_local, tokens per rank (tail padded)."""


@dataclass
class Manifest:
    """Everything a run needs to trust an engine directory (written by `ropesp build`)."""

    backend: str
    """Build backend: onnx | aoti | tensorrt."""
    model: dict
    """ModelConfig.to_dict()."""
    world_size: int
    dtype: str
    """Model dtype: float32 | bfloat16 | float16."""
    device: str
    """cpu | cuda: where the artifacts run."""
    chunk_frames: int
    frame_shapes: list[int]
    """Chunk lengths (latent frames) with a segment set: [chunk_frames] (+ [1] with an independent first frame)."""
    geometry: dict
    """latent_height, latent_width, rows, cols, frame_tokens."""
    max_frames: int
    """Default video length / cache capacity in latent frames."""
    local_attn_frames: int
    """Rolling window in frames (sink included), -1 = global attention."""
    sink_frames: int
    versions: dict
    """torch, cuda, tensorrt (or None), onnx (or None), ropesp."""
    gpu_arch: str
    """sm_XY of the build GPU, or "cpu"."""
    segments: list[SegmentSpec]
    ranks: list[RankFiles]
    files: dict[str, str]
    """Relative path -> SHA-256 of every artifact, weights included."""
    weights: str = WEIGHTS
    build_seconds: float = 0.0
    format: int = FORMAT
    root: Path | None = field(default=None, compare=False, repr=False)
    """The directory it was loaded from (not serialized)."""

    # --- (de)serialization --------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("root")
        return d

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Manifest:
        """Read DIR/manifest.json; EngineError when it is missing or malformed."""
        root = Path(directory)
        path = root / MANIFEST
        if not path.is_file():
            hint = "the directory does not exist" if not root.exists() else "no manifest.json in it"
            raise EngineError(
                f"{arg('engines', root)}: {hint}; build engines with `ropesp build --out {root}`"
            )
        try:
            raw = json.loads(path.read_text())
            segments = [
                SegmentSpec(
                    **{
                        **s,
                        "inputs": [TensorSpec(**t) for t in s["inputs"]],
                        "outputs": [TensorSpec(**t) for t in s["outputs"]],
                    }
                )
                for s in raw.pop("segments")
            ]
            ranks = [RankFiles(**r) for r in raw.pop("ranks")]
            return cls(**raw, segments=segments, ranks=ranks, root=root)
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise EngineError(
                f"{path} is not a valid ropesp manifest ({type(exc).__name__}: {exc}); rebuild with `ropesp build`"
            ) from None

    # --- what the runtime reads ---------------------------------------------------------------
    def backend_for_runtime(self) -> str:
        """The `generate --backend` that runs this build (onnx -> ort)."""
        if self.backend not in RUNTIME_BACKENDS:
            raise EngineError(
                f"{self._where()}: unknown backend {self.backend!r}; this ropesp runs {sorted(RUNTIME_BACKENDS)}"
            )
        return RUNTIME_BACKENDS[self.backend]

    def model_config(self):
        """The ModelConfig the engines were built for."""
        from ropesp.config import ModelConfig

        return ModelConfig.from_dict(self.model)

    def segment(self, name: str, frames: int) -> SegmentSpec:
        for s in self.segments:
            if s.name == name and s.frames == frames:
                return s
        raise EngineError(
            f"{self._where()} has no {name!r} segment for {frames}-frame chunks; built for chunks of "
            f"{self.frame_shapes} frames: rebuild with matching --chunk-frames / --independent-first-frame"
        )

    def rank_files(self, rank: int) -> RankFiles:
        for r in self.ranks:
            if r.rank == rank:
                return r
        raise EngineError(f"{self._where()} lists no files for rank {rank} (world size {self.world_size})")

    # --- checks -------------------------------------------------------------------------------
    def validate(self, *, world_size: int, rank: int | None = None, device="cpu") -> None:
        """Refuse (EngineError) an engine directory that does not fit this run.

        world_size: ranks of the run; rank: this process (None: check every rank's files);
        device: "cpu", "cuda", "cuda:N" or a torch.device.
        """
        where = self._where()
        if self.format != FORMAT:
            raise EngineError(f"{where}: manifest format {self.format}, this ropesp reads {FORMAT}; rebuild")
        self.backend_for_runtime()
        self.check_world_size(world_size)
        if rank is not None and not 0 <= rank < world_size:
            raise EngineError(f"rank {rank} is outside [0, {world_size})")
        dev = str(device)
        dev_type = dev.split(":")[0]
        if dev_type != self.device:
            raise EngineError(
                f"{where} holds {self.backend} artifacts for {self.device}, but this run is on {dev_type}: "
                f"run with --device {self.device} or rebuild with --device {dev_type}"
            )
        env = runtime_environment(dev, self.backend)
        if self.device == "cuda" and env["gpu_arch"] != self.gpu_arch:
            raise EngineError(
                f"{where} was built for {self.gpu_arch}, this GPU is {env['gpu_arch']}: rebuild on this GPU"
            )
        if self.backend in PINNED_VERSIONS:  # compiled artifacts run only under the version that built them
            key, what = PINNED_VERSIONS[self.backend]
            built, here = self.versions.get(key), env.get(key)
            if here is not None and built != here:
                raise EngineError(
                    f"{where}: {what} were built with {key} {built}, this is {key} {here}; rebuild with this {key}"
                )
        self.verify_files(rank)

    def check_world_size(self, world_size: int) -> None:
        """Engines are per rank: refuse another world size (cheap; the launcher calls it before spawning)."""
        if world_size != self.world_size:
            raise EngineError(
                f"{self._where()} was built for world size {self.world_size}, but this run has {world_size} "
                f"ranks: run with --world-size {self.world_size} or rebuild with `ropesp build --world-size "
                f"{world_size}`"
            )

    def verify_files(self, rank: int | None = None) -> None:
        """Every file of rank (None: all) and the shared weights exists and has its digest (file_digest);
        the files are hashed concurrently, large ones in blocks."""
        assert self.root is not None, "verify_files needs a manifest loaded from a directory"
        own = f"rank{rank}/"
        wanted = {}
        for rel, digest in sorted(self.files.items()):
            if rank is not None and rel.startswith("rank") and not rel.startswith(own):
                continue
            path = self.root / rel
            if not path.is_file():
                raise EngineError(
                    f"{path} is missing (listed in {self.root / MANIFEST}); rebuild with `ropesp build`"
                )
            wanted[path] = digest
        with ThreadPoolExecutor(max_workers=len(wanted) or 1) as pool:
            got = dict(zip(wanted, pool.map(lambda item: file_digest(*item), wanted.items())))
        for path, digest in wanted.items():
            if got[path] != digest:
                raise EngineError(
                    f"{path} is corrupted or was modified: digest {got[path][:24]}... differs from the "
                    f"manifest's {digest[:24]}...; rebuild with `ropesp build`"
                )

    def _where(self) -> str:
        return f"engine directory {self.root}" if self.root is not None else "engine manifest"


TREE_PREFIX = "sha256-blocks-64MiB:"
"""Digest of a large file: SHA-256 over the SHA-256 of each 64 MiB block, so the blocks hash in parallel
(a 2.8 GB weights file took 2.7 s as one SHA-256 on the H200 machine's host, the largest part of the
engines' start-up then). Smaller files keep the plain SHA-256 of the whole file."""
TREE_BLOCK = 64 << 20
TREE_MIN_SIZE = 4 * TREE_BLOCK


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _block_sha256(path: Path, offset: int, size: int) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        while size > 0:
            piece = f.read(min(size, 8 << 20))
            if not piece:
                break
            h.update(piece)  # releases the GIL: blocks hash on separate cores
            size -= len(piece)
    return h.digest()


def file_digest(path: Path, expected: str | None = None) -> str:
    """The manifest's digest of path: TREE_PREFIX + block tree hash for files of TREE_MIN_SIZE and more,
    else the plain SHA-256 hex. `expected` (a manifest entry) selects the form, so plain digests of large
    files also verify."""
    size = path.stat().st_size
    tree = expected.startswith(TREE_PREFIX) if expected is not None else size >= TREE_MIN_SIZE
    if not tree:
        return sha256(path)
    offsets = range(0, size, TREE_BLOCK)
    with ThreadPoolExecutor(max_workers=min(len(offsets), os.cpu_count() or 1)) as pool:
        blocks = pool.map(lambda off: _block_sha256(path, off, min(TREE_BLOCK, size - off)), offsets)
        return TREE_PREFIX + hashlib.sha256(b"".join(blocks)).hexdigest()


def runtime_environment(device: str = "cpu", backend: str | None = None) -> dict:
    """Versions and GPU arch of this process (torch imported lazily; tensorrt only for that backend)."""
    import torch

    import ropesp

    env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "ropesp": ropesp.__version__,
        "tensorrt": None,
        "gpu_arch": "cpu",
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(torch.device(device))
        env["gpu_arch"] = f"sm_{major}{minor}"
    if backend == "tensorrt":
        try:
            import tensorrt

            env["tensorrt"] = tensorrt.__version__
        except (ImportError, OSError):
            pass  # the backend itself reports that TensorRT is missing
    return env

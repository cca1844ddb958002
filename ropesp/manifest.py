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
        if not path.resolve().is_relative_to(root.resolve()):
            raise EngineError(f"{path} resolves outside {root} (a symlink); refused")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise EngineError(f"{path} is not valid JSON ({exc}); rebuild with `ropesp build`") from None
        problem = schema_problem(raw)
        if problem:
            raise EngineError(
                f"{path} is not a valid ropesp manifest: {problem}; rebuild with `ropesp build`"
            )
        try:
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
        except (KeyError, TypeError) as exc:  # schema_problem checked every key: a field of another ropesp
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
    def validate(
        self, *, world_size: int, rank: int | None = None, device="cpu", weights_digest: bool = True
    ) -> None:
        """Refuse (EngineError) an engine directory that does not fit this run.

        world_size: ranks of the run; rank: this process (None: check every rank's files);
        device: "cpu", "cuda", "cuda:N" or a torch.device; weights_digest False leaves the weights
        file's digest to the caller (`verify_files(rank, code=False)`), which may hash it while it loads
        the weights (data only), never before loading a package (code).
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
        ext = EXTENSIONS[self.backend]
        for rel in sorted({rel for r in self.ranks for rel in r.files.values()}):
            if not rel.endswith(ext):
                raise EngineError(
                    f"{where}: {rel} is not a {ext} file, though the manifest says backend "
                    f"{self.backend!r}; rebuild with `ropesp build`"
                )
        self.verify_files(rank, weights=weights_digest)

    def check_world_size(self, world_size: int) -> None:
        """Engines are per rank: refuse another world size (cheap; the launcher calls it before spawning)."""
        if world_size != self.world_size:
            raise EngineError(
                f"{self._where()} was built for world size {self.world_size}, but this run has {world_size} "
                f"ranks: run with --world-size {self.world_size} or rebuild with `ropesp build --world-size "
                f"{world_size}`"
            )

    def confined(self, rel: str) -> Path:
        """root / rel for a file the manifest lists; EngineError unless rel is a plain relative path that
        resolves (symlinks followed) inside the engine directory. Every file the runtime opens comes
        through here, so nothing outside the directory is ever read, hashed or named."""
        assert self.root is not None, "confined needs a manifest loaded from a directory"
        where = self._where()
        if rel not in self.files:
            raise EngineError(
                f"{where}: {rel!r} is not in the manifest's SHA-256 list; rebuild with `ropesp build`"
            )
        if not _plain_relative(rel):
            raise EngineError(
                f"{where}: {rel!r} is not a relative path inside the engine directory; refused (rebuild "
                "with `ropesp build`)"
            )
        path = self.root / rel
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise EngineError(f"{where}: {rel} resolves outside the engine directory (a symlink); refused")
        return path

    def verify_files(self, rank: int | None = None, *, weights: bool = True, code: bool = True) -> None:
        """Every file of rank (None: all) and the shared weights exists inside the directory and has its
        digest (file_digest); the files are hashed concurrently, large ones in blocks. weights / code:
        whether the weights file / every other file (engines, plugin libraries) is checked."""
        assert self.root is not None, "verify_files needs a manifest loaded from a directory"
        own = f"rank{rank}/"
        needed = set() if rank is None else {self.weights, *self.rank_files(rank).files.values()}
        wanted = {}
        for rel, digest in sorted(self.files.items()):
            if rank is not None and rel.startswith("rank") and not rel.startswith(own) and rel not in needed:
                continue
            if not (weights if rel == self.weights else code):
                continue
            path = self.confined(rel)
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


# --- schema: every field's type and range, and the cross-references the runtime follows -------
SEGMENT_NAMES = ("embed", "pre", "post", "head")
_INT_MODEL_FIELDS = ("dim", "ffn_dim", "freq_dim", "num_heads", "num_layers", "in_dim", "out_dim")


def _is_digest(v: str) -> bool:
    """A plain SHA-256 hex digest, or TREE_PREFIX + one."""
    hexpart = v.removeprefix(TREE_PREFIX)
    return len(hexpart) == 64 and all(c in "0123456789abcdef" for c in hexpart)


def _is_int(v, lo: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int_map(d, keys: set[str], lo: int) -> bool:
    return isinstance(d, dict) and set(d) == keys and all(_is_int(v, lo) for v in d.values())


def _tensor_problem(t, where: str) -> str | None:
    if (
        not isinstance(t, dict)
        or not {"name", "dtype", "shape"} <= set(t)
        or not set(t) <= {"name", "dtype", "shape", "kind", "dynamic"}
    ):
        return f"{where} must be an object with name, dtype, shape (kind, dynamic)"
    if not isinstance(t["name"], str) or not isinstance(t["dtype"], str):
        return f"{where}: name and dtype must be strings"
    if not isinstance(t["shape"], list) or not all(_is_int(d) for d in t["shape"]):
        return f"{where}.shape {t['shape']!r} must be a list of integers >= 0"
    if t.get("kind", "activation") not in ("activation", "weight"):
        return f"{where}.kind {t.get('kind')!r} must be activation or weight"
    dyn = t.get("dynamic", {})
    if not isinstance(dyn, dict) or not all(
        isinstance(v, list) and len(v) == 3 and all(_is_int(x) for x in v) for v in dyn.values()
    ):
        return f"{where}.dynamic must map dims to [min, opt, max]"
    return None


def _model_problem(m) -> str | None:
    if not isinstance(m, dict):
        return "model must be an object"
    for k in _INT_MODEL_FIELDS + ("text_len", "text_dim"):
        if k in m or k in _INT_MODEL_FIELDS:
            if not _is_int(m.get(k), 1):
                return f"model.{k} {m.get(k)!r} must be an integer >= 1"
    ps = m.get("patch_size", [1, 2, 2])
    if not isinstance(ps, list) or len(ps) != 3 or not all(_is_int(p, 1) for p in ps):
        return f"model.patch_size {ps!r} must be three integers >= 1"
    for k in ("qk_norm", "cross_attn_norm"):
        if k in m and not isinstance(m[k], bool):
            return f"model.{k} {m[k]!r} must be true or false"
    for k in ("eps", "rope_theta"):
        if k in m and not (_is_num(m[k]) and m[k] > 0):
            return f"model.{k} {m[k]!r} must be a number > 0"
    from ropesp.config import ModelConfig  # stdlib-only module
    from ropesp.errors import ConfigError

    try:
        ModelConfig.from_dict(m)
    except ConfigError as exc:
        return f"model: {exc}"
    return None


def schema_problem(raw) -> str | None:
    """What is wrong with a manifest.json document (None: nothing): types, ranges, and that every
    segment, rank and file the runtime follows is present and listed. Version and setup fit is
    Manifest.validate's job."""
    if not isinstance(raw, dict):
        return "the document must be a JSON object"
    if raw.get("format") != FORMAT:
        return f"manifest format {raw.get('format')!r}, this ropesp reads {FORMAT}"
    known = {f.name for f in dataclasses.fields(Manifest)} - {"root"}
    required = known - {"weights", "build_seconds", "format"}
    if missing := sorted(required - set(raw)):
        return f"missing fields {missing}"
    if unknown := sorted(set(raw) - known):
        return f"unknown fields {unknown}"
    for k in ("backend", "dtype", "device", "gpu_arch", "weights"):
        if k in raw and not isinstance(raw[k], str):
            return f"{k} {raw[k]!r} must be a string"
    if raw["device"] not in ("cpu", "cuda"):
        return f"device {raw['device']!r} must be cpu or cuda"
    for k, lo in (("world_size", 1), ("chunk_frames", 1), ("max_frames", 1), ("sink_frames", 0)):
        if not _is_int(raw[k], lo):
            return f"{k} {raw[k]!r} must be an integer >= {lo}"
    if not _is_int(raw["local_attn_frames"], -1) or raw["local_attn_frames"] == 0:
        return f"local_attn_frames {raw['local_attn_frames']!r} must be -1 or an integer >= 1"
    if not _is_num(raw.get("build_seconds", 0.0)):
        return "build_seconds must be a number"
    if not isinstance(raw["versions"], dict):
        return "versions must be an object"
    if problem := _model_problem(raw["model"]):
        return problem
    shapes = raw["frame_shapes"]
    if not isinstance(shapes, list) or not shapes or not all(_is_int(f, 1) for f in shapes):
        return f"frame_shapes {shapes!r} must be a non-empty list of integers >= 1"
    if raw["chunk_frames"] not in shapes or len(set(shapes)) != len(shapes):
        return f"frame_shapes {shapes} must hold chunk_frames {raw['chunk_frames']} once"
    g = raw["geometry"]
    keys = {"latent_height", "latent_width", "rows", "cols", "frame_tokens"}
    if not _int_map(g, keys, 1):
        return f"geometry must hold integers >= 1 for {sorted(keys)}"
    _, ph, pw = raw["model"].get("patch_size", [1, 2, 2])
    if (g["rows"] * ph, g["cols"] * pw, g["rows"] * g["cols"]) != (
        g["latent_height"],
        g["latent_width"],
        g["frame_tokens"],
    ):
        return f"geometry {g} is inconsistent (rows x patch = latent_height, cols x patch = latent_width)"
    files = raw["files"]
    if not isinstance(files, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and _is_digest(v) for k, v in files.items()
    ):
        return "files must map relative paths to SHA-256 hex digests (or block digests of large files)"
    if escaping := sorted(k for k in files if not _plain_relative(k)):
        return f"files entry {escaping[0]!r} is not a relative path inside the engine directory"
    if raw.get("weights", WEIGHTS) not in files:
        return f"weights {raw.get('weights', WEIGHTS)!r} is not listed in files"
    segments = raw["segments"]
    if not isinstance(segments, list):
        return "segments must be a list"
    seen, stems = set(), set()
    for i, s in enumerate(segments):
        where = f"segments[{i}]"
        if not isinstance(s, dict) or set(s) != {
            "name",
            "frames",
            "stem",
            "inputs",
            "outputs",
            "weight_scope",
        }:
            return f"{where} must hold exactly name, frames, stem, inputs, outputs, weight_scope"
        if s["name"] not in SEGMENT_NAMES or s["frames"] not in shapes or (s["name"], s["frames"]) in seen:
            return (
                f"{where} ({s['name']!r}, {s['frames']!r} frames) is not a segment of frame_shapes {shapes}"
            )
        if not isinstance(s["stem"], str) or not _plain_relative(s["stem"]) or "/" in s["stem"]:
            return f"{where}.stem {s['stem']!r} must be a plain file stem"
        if not isinstance(s["weight_scope"], str):
            return f"{where}.weight_scope must be a string"
        for io in ("inputs", "outputs"):
            if not isinstance(s[io], list) or not s[io]:
                return f"{where}.{io} must be a non-empty list"
            for j, t in enumerate(s[io]):
                if problem := _tensor_problem(t, f"{where}.{io}[{j}]"):
                    return problem
        if s["name"] == "embed":
            lat = s["inputs"][0]["shape"]
            want = [1, s["frames"], raw["model"]["in_dim"], g["latent_height"], g["latent_width"]]
            if lat[1:] != want[1:]:
                return f"{where} takes latents {lat}, but model and geometry give {want}"
        seen.add((s["name"], s["frames"]))
        stems.add(s["stem"])
    if missing := sorted({(n, f) for n in SEGMENT_NAMES for f in shapes} - seen):
        return f"segments lack {missing} (segment, chunk frames) of frame_shapes {shapes}"
    ranks = raw["ranks"]
    if not isinstance(ranks, list) or len(ranks) != raw["world_size"]:
        return f"ranks must list world_size {raw['world_size']} ranks"
    frame_keys = {str(f) for f in shapes}
    for i, r in enumerate(ranks):
        where = f"ranks[{i}]"
        if not isinstance(r, dict) or set(r) != {"rank", "files", "first_token", "local_tokens"}:
            return f"{where} must hold exactly rank, files, first_token, local_tokens"
        if r["rank"] != i or not _is_int(r["rank"]):
            return f"{where}.rank {r['rank']!r} must be {i}"
        if not isinstance(r["files"], dict) or set(r["files"]) != stems:
            return f"{where}.files must map every segment stem {sorted(stems)} to a file"
        for stem, rel in r["files"].items():
            if not isinstance(rel, str) or rel not in files:
                return f"{where}.files[{stem!r}] {rel!r} is not listed in files (with its SHA-256)"
        if not _int_map(r["first_token"], frame_keys, 0) or not _int_map(r["local_tokens"], frame_keys, 1):
            return f"{where}: first_token and local_tokens must map each of {sorted(frame_keys)} to a token count"
    return None


def _plain_relative(rel: str) -> bool:
    """A relative POSIX path of plain names: no root, drive, backslash, '.', '..' or empty part."""
    if not rel or "\\" in rel or "\0" in rel or rel.startswith("/") or ":" in rel.split("/")[0]:
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


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

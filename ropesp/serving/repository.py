"""Write (and read back) a Triton model repository that serves a ropesp pipeline with streaming.

    REPO/ropesp/config.pbtxt            python backend, decoupled, KIND_MODEL instances (one engine each;
                                        with several, a sequence batcher pins each stream to one)
    REPO/ropesp/1/model.py              from model.py.tmpl: imports ropesp.serving.triton_model
    REPO/ropesp/1/ropesp_config.json    the run settings (ropesp.settings), the Python environment
    REPO/ropesp/1/artifacts/            engines, checkpoint, model config, VAE, text encoder (copied or linked)

The repository is relocatable: every artifact lives under `1/artifacts/` and ropesp_config.json names it
relative to `1/`. It also records the Python environment that holds ropesp (executable, version,
sys.path, site directories, libpython's directory): the python backend ignores PYTHONPATH, so
model.py puts those paths on sys.path itself, and `TritonServer` runs the backend stub on that
environment's libpython (docs/PLATFORM.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import site
import sys
import sysconfig
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ropesp.errors import ConfigError
from ropesp.output_paths import output_dir_problem
from ropesp.serving.instances import instance_gpus, visible_gpus

MODEL_NAME = "ropesp"
CONFIG_FILE = "ropesp_config.json"
ARTIFACTS = "artifacts"
FORMAT = 2
"""Version of the ropesp_config.json layout."""
ARTIFACT_FIELDS = {
    "source": ("checkpoint", "model_config", "engines", "model_dir"),
    "decode": ("vae", "taehv"),
    "prompt": ("text_encoder",),
}
"""The settings that name files, by section: placed under artifacts/ and stored relative (RANDOM_WEIGHTS,
seeded weights, names no file and is kept as it is)."""
MODEL_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
"""A plain Triton model name: one directory name inside the repository."""
MODEL_FILES = {"config.pbtxt", "1", "1/model.py", f"1/{CONFIG_FILE}", f"1/{ARTIFACTS}", "1/__pycache__"}
"""What write_repository puts in a model directory (artifacts/ and __pycache__/ hold only its own files)."""


@dataclass(frozen=True)
class PythonEnv:
    """The Python environment that runs the model (and the worker ranks)."""

    executable: str
    """Interpreter of the worker ranks."""
    version: str
    """major.minor: picks the backend stub build."""
    path: tuple[str, ...]
    """sys.path entries, put first on the stub's sys.path."""
    site_dirs: tuple[str, ...]
    """Site directories whose .pth files must run (editable installs)."""
    libdir: str | None
    """Directory of libpython (shared builds): the stub is run on this libpython."""

    @classmethod
    def current(cls) -> PythonEnv:
        """The environment of the running interpreter."""
        sites = [*site.getsitepackages()]
        if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
            sites.append(site.getusersitepackages())
        libdir = sysconfig.get_config_var("LIBDIR") if sysconfig.get_config_var("Py_ENABLE_SHARED") else None
        return cls(
            sys.executable,
            f"{sys.version_info.major}.{sys.version_info.minor}",
            tuple(os.path.abspath(p) for p in sys.path if p and os.path.isdir(p)),
            tuple(s for s in sites if os.path.isdir(s)),
            libdir,
        )

    @classmethod
    def from_dict(cls, raw: dict) -> PythonEnv:
        return cls(
            raw["executable"],
            raw["version"],
            tuple(raw["path"]),
            tuple(raw["site_dirs"]),
            raw.get("libdir"),
        )


@dataclass(frozen=True)
class ServedModel:
    """What ropesp_config.json holds, with artifact paths made absolute."""

    config: object
    """The ropesp.settings.RunConfig the engine runs."""
    python: PythonEnv
    instances: int = 1
    """Engines the model serves as Triton instances."""


SEQUENCE_SLOTS = 64
"""Streams Triton tracks per instance at once (running, or ended but not yet closed by their client);
beyond them a new stream waits in Triton's backlog. Far above an engine's --max-streams, so that the
engine's own admission answers a stream it cannot serve ("at capacity"), as with one instance."""
SEQUENCE_IDLE_S = 3600
"""Seconds a stream's sequence may go without a request (its start, then its control requests) before
Triton forgets which instance holds it: the stream runs on, but can no longer be steered. A client that
vanished without closing its sequence frees its slot after this long."""


def config_pbtxt(name: str, text_dim: int, world_size: int, instances: int = 1) -> str:
    """The model configuration: a decoupled python model of `instances` KIND_MODEL instances, each an
    engine that owns its ranks. With several, Triton's sequence batcher pins each stream to one instance
    (sequence_batching below)."""

    def tensor(tname: str, dtype: str, dims: str, optional: bool = False) -> str:
        opt = " optional: true" if optional else ""
        return f'  {{ name: "{tname}" data_type: TYPE_{dtype} dims: [ {dims} ]{opt} }}'

    # a stream request: prompt_embeds or prompt, seed, latent_frames (+ height/width, + stream_id to steer
    # it); a control request: stream_id, control ("swap" | "recache" | "cut" | "cancel" | "end") and the new prompt
    inputs = [
        tensor("prompt_embeds", "FP32", f"-1, {text_dim}", optional=True),
        tensor("prompt", "STRING", "1", optional=True),
        tensor("seed", "INT64", "1", optional=True),
        tensor("latent_frames", "INT32", "1", optional=True),
        tensor("height", "INT32", "1", optional=True),
        tensor("width", "INT32", "1", optional=True),
        tensor("stream_id", "STRING", "1", optional=True),
        tensor("control", "STRING", "1", optional=True),
    ]
    outputs = [
        tensor("frames", "UINT8", "-1, -1, -1, 3"),
        tensor("latents", "FP32", "-1, -1, -1, -1"),
        tensor("chunk_index", "INT32", "1"),
        tensor("timing_ms", "FP32", "1"),
        tensor("prompt_version", "INT32", "1"),
    ]
    lines = [
        f'name: "{name}"',
        'backend: "python"',
        "max_batch_size: 0",
        "model_transaction_policy { decoupled: true }",
        "input [\n" + ",\n".join(inputs) + "\n]",
        "output [\n" + ",\n".join(outputs) + "\n]",
        f"instance_group [ {{ kind: KIND_MODEL count: {instances} }} ]",
    ]
    if instances > 1:
        lines.append(sequence_batching())
    lines += [f'parameters {{ key: "world_size" value: {{ string_value: "{world_size}" }} }}', ""]
    return "\n".join(lines)


def sequence_batching() -> str:
    """The sequence batcher of a model of several instances: a stream request starts a sequence (its
    stream_id as the correlation ID, START flag), Triton gives it a slot of one instance, and sends every
    later request of that ID (the stream's control requests) to the same instance until one carries the
    END flag (the client's "end" control). `oldest`: many sequences per instance (`direct` gives one per
    instance at max_batch_size 0, the rest wait); the model is decoupled, so a control request is
    delivered while its stream is still streaming. Only with several instances: the batcher refuses a
    request without a correlation ID."""
    idle_us = SEQUENCE_IDLE_S * 1_000_000
    return (
        f"sequence_batching {{ max_sequence_idle_microseconds: {idle_us} "
        f"oldest {{ max_candidate_sequences: {SEQUENCE_SLOTS} }} }}"
    )


def _place(src: str, artifacts: Path, name: str, link: bool) -> str:
    """Copy (or symlink) an artifact under artifacts/name; returns its path relative to the version dir.

    A sharded checkpoint's index (*.index.json) brings its whole directory; a single weights file brings
    the config.json beside it (the loader reads it from there).
    """
    path = Path(src).resolve()
    if not path.exists():
        raise ConfigError(f"{src} does not exist")
    root = path.parent if path.is_file() and path.name.endswith(".index.json") else path
    dest = artifacts / name / root.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    sidecar = path.parent / "config.json"
    items = [(root, dest)]
    if path.is_file() and root == path and sidecar.is_file() and sidecar != path:
        items.append((sidecar, dest.parent / sidecar.name))
    for item, target in items:
        if link:
            target.symlink_to(item, target_is_directory=item.is_dir())
        elif name == "engines":
            _copy_engines(item, target)
        elif item.is_dir():
            shutil.copytree(item, target)  # symlinks followed: the repository holds real files
        else:
            shutil.copy2(item, target)
    placed = dest / path.relative_to(root) if root != path else dest
    return placed.relative_to(artifacts.parent).as_posix()


def _copy_engines(src: Path, dest: Path) -> None:
    """Copy an engine directory: its manifest and the files it lists, verified (nothing else, never a
    file outside src), as real files."""
    from ropesp.manifest import MANIFEST, Manifest

    manifest = Manifest.load(src)
    manifest.verify_files()  # every listed file inside src, with its SHA-256
    dest.mkdir(parents=True)
    for rel in [MANIFEST, *sorted(manifest.files)]:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(manifest.confined(rel) if rel != MANIFEST else src / MANIFEST, dest / rel)


def check_model_name(name: str) -> None:
    """Refuse (ConfigError) a model name that is not one plain directory name."""
    if not isinstance(name, str) or not MODEL_NAME_RE.fullmatch(name):
        raise ConfigError(
            f"--model-name {name!r}: a model name is letters, digits, '_', '-' and '.' (not first), "
            "one directory name inside --out"
        )


def _replaceable(model_dir: Path) -> bool:
    """Whether model_dir holds a ropesp model written by write_repository and nothing else."""
    if model_dir.is_symlink() or not (model_dir / "1" / CONFIG_FILE).is_file():
        return False
    entries = [p.relative_to(model_dir).as_posix() for p in model_dir.iterdir()]
    entries += [p.relative_to(model_dir).as_posix() for p in (model_dir / "1").iterdir()]
    return set(entries) <= MODEL_FILES


def write_repository(
    out: str | Path,
    config,
    *,
    model_name: str = MODEL_NAME,
    instances: int = 1,
    link: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write REPO/<model_name>/ serving the run settings `config` (a ropesp.settings.RunConfig) with
    `instances` engines; returns the model dir.

    Validates everything first (the same checks as `ropesp generate`), so a bad config writes nothing.
    link=True symlinks the artifacts instead of copying them (the repository is then not relocatable).
    """
    from ropesp.runtime.pipeline import resolve, with_default_model

    config = with_default_model(config)
    res = resolve(config)
    world = res.world_size
    config = config.replace(world_size=world)
    check_model_name(model_name)
    if isinstance(instances, bool) or not isinstance(instances, int) or instances < 1:
        raise ConfigError(f"--instances {instances} must be an integer >= 1")
    if res.device == "cuda":
        instance_gpus(visible_gpus(), 0, instances, world)  # refuses too few GPUs, as each instance would
    if Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"--out {out} is a file; choose a directory for the repository")
    if problem := output_dir_problem(out):
        raise ConfigError(problem)
    model_dir = Path(out) / model_name
    if model_dir.exists() or model_dir.is_symlink():
        if not overwrite:
            raise ConfigError(f"{model_dir} exists; remove it or pass --force to replace it")
        if not _replaceable(model_dir):
            raise ConfigError(
                f"{model_dir} is not a ropesp model written by `ropesp serve-repo` (or holds other "
                "files); --force replaces only such a model: move it or choose another --model-name"
            )
        shutil.rmtree(model_dir)
    try:
        return _write_model(model_dir, config, res, instances, link)
    except BaseException:
        shutil.rmtree(model_dir, ignore_errors=True)  # nothing half-written
        raise


def _write_model(model_dir: Path, config, res, instances: int, link: bool) -> Path:
    """write_repository's writing part (everything validated); returns model_dir."""
    from ropesp.settings import RANDOM_WEIGHTS

    model_name = model_dir.name
    version = model_dir / "1"
    artifacts = version / ARTIFACTS
    version.mkdir(parents=True)
    placed = {}
    for part, names in ARTIFACT_FIELDS.items():
        for name in names:
            value = getattr(getattr(config, part), name)
            if value and value != RANDOM_WEIGHTS:
                placed[name] = _place(value, artifacts, name, link)
    spec = {
        "format": FORMAT,
        "config": config.replace(**placed).to_dict(),
        "instances": instances,
        "linked": link,
        "python": dataclasses.asdict(PythonEnv.current()),
    }
    (version / CONFIG_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    template = resources.files("ropesp.serving").joinpath("model.py.tmpl").read_text()
    (version / "model.py").write_text(template)
    (model_dir / "config.pbtxt").write_text(
        config_pbtxt(model_name, res.model.text_dim, res.world_size, instances)
    )
    return model_dir


def read_model_config(version_dir: str | Path) -> ServedModel:
    """Load <model>/1/ropesp_config.json, resolving artifact paths against the version directory (every
    instance reads the same settings: its GPUs come from instances.pin_instance_gpus)."""
    from ropesp.settings import RANDOM_WEIGHTS, RunConfig

    version_dir = Path(version_dir)
    spec = json.loads((version_dir / CONFIG_FILE).read_text())
    if spec.get("format") != FORMAT:
        raise ConfigError(
            f"{version_dir / CONFIG_FILE} has format {spec.get('format')}; this ropesp reads {FORMAT}: "
            "write the repository again with `ropesp serve-repo`"
        )
    raw = {part: dict(values) for part, values in spec["config"].items()}
    linked = spec.get("linked") is True
    for part, names in ARTIFACT_FIELDS.items():  # confined before anything reads them
        for name in names:
            rel = raw.get(part, {}).get(name)
            if rel and rel != RANDOM_WEIGHTS:
                raw[part][name] = str(_confined(version_dir, rel, name, linked))
    config = RunConfig.from_dict(raw)
    return ServedModel(config, PythonEnv.from_dict(spec["python"]), int(spec.get("instances", 1)))


def _confined(version_dir: Path, rel, name: str, linked: bool) -> Path:
    """version_dir / rel for an artifact path of ropesp_config.json: relative, under artifacts/, no '..',
    and (unless the repository was written with --link) resolving inside version_dir."""
    where = f"{version_dir / CONFIG_FILE}: {name}"
    if not isinstance(rel, str) or "\\" in rel:
        raise ConfigError(f"{where} {rel!r} is not a relative path; write the repository again")
    parts = Path(rel).parts
    if Path(rel).is_absolute() or ".." in parts or not parts or parts[0] != ARTIFACTS:
        raise ConfigError(
            f"{where} {rel!r} is outside {ARTIFACTS}/ of the model; write the repository again with "
            "`ropesp serve-repo`"
        )
    path = version_dir / rel
    if not linked and not path.resolve().is_relative_to(version_dir.resolve()):
        raise ConfigError(f"{where} {rel!r} resolves outside the model directory (a symlink); refused")
    return path


def recorded_python(repo: str | Path) -> PythonEnv | None:
    """The Python environment recorded by the first ropesp model in a repository, if any."""
    for spec in sorted(Path(repo).glob(f"*/*/{CONFIG_FILE}")):
        return PythonEnv.from_dict(json.loads(spec.read_text())["python"])
    return None

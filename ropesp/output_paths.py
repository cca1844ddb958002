"""Where commands write: a path checked before the work (an engine build, minutes of benchmark or
scoring), not when the result is ready, and a JSON report written whole or not at all.

    output_file_problem(path, "--json")  -> why a file cannot be written there, or None
    output_dir_problem(path, "--out")    -> why a directory cannot be made or filled there, or None
    write_report(path, report)           -> the report as JSON, through a file moved into place
    write_together(dir, {name: writer})  -> several files that replace the old ones all or none
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path


def output_dir_problem(path: str | Path, flag: str = "--out") -> str | None:
    """Why a directory cannot be made (or filled) at path, naming flag as given (None when it can)."""
    why = _unwritable(Path(path))
    return None if why is None else f"{flag} {path}: {why}"


def output_file_problem(path: str | Path, flag: str = "--json") -> str | None:
    """Why a file cannot be written at path, naming flag as given (None when it can); its directory may
    be new (write_report makes it)."""
    target = Path(path)
    if target.is_dir():
        return f"{flag} {path}: is a directory; name the file to write"
    why = _unwritable(target.parent)
    return None if why is None else f"{flag} {path}: {why}"


def _unwritable(directory: Path) -> str | None:
    """Why directory cannot be made or written, making nothing: the nearest existing of it and its
    parents must be a writable directory."""
    existing = next(p for p in (directory, *directory.parents) if p.exists() or p.is_symlink())
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    if not os.access(existing, os.W_OK):
        return f"{existing} is not writable"
    return None


def write_report(path: str, report: dict, indent: int = 1) -> None:
    """report as JSON at path, through a file beside it: a reader never finds half a report."""
    target = Path(path)
    write_together(
        target.parent, {target.name: lambda part: part.write_text(json.dumps(report, indent=indent))}
    )


def write_together(directory: str | Path, writers: dict[str, Callable[[Path], object]]) -> None:
    """Files written as one: each writer writes its file as NAME.part in directory, then all are renamed
    in the dict's order (put last the file a reader checks first, e.g. an index), so a failure or an
    interrupt while writing leaves the directory's earlier files as they were and no .part behind."""
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    parts = {name: target / f"{name}.part" for name in writers}
    try:
        for name, write in writers.items():
            write(parts[name])
        for name, part in parts.items():
            os.replace(part, target / name)
    finally:
        for part in parts.values():
            part.unlink(missing_ok=True)

"""The JSON reports of commands that run for minutes first (`ropesp bench --json`, `python -m
ropesp.demo.evaluate` and `.long_stream`): the path checked before the run, the file written whole or not
at all."""

from __future__ import annotations

import json
import os
from pathlib import Path


def report_path_problem(path: str, flag: str = "--json") -> str | None:
    """Why path cannot take a report, naming flag (None when it can). Its directory is made here (a
    report may go to a new folder) and must then be writable."""
    target = Path(path)
    if target.is_dir():
        return f"{flag} {path}: is a directory; name the file to write"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"{flag} {path}: cannot make its directory ({exc.strerror or exc})"
    if not os.access(target.parent, os.W_OK):
        return f"{flag} {path}: its directory is not writable"
    return None


def write_report(path: str, report: dict, indent: int = 1) -> None:
    """report as JSON at path, through a file beside it: a reader never finds half a report."""
    target = Path(path)
    part = target.with_name(target.name + ".part")
    try:
        part.write_text(json.dumps(report, indent=indent))
        os.replace(part, target)
    finally:
        part.unlink(missing_ok=True)

"""The run settings (ropesp/settings.py) as command-line flags: every flag with its help line, choices,
units and default, generated from the one declaration of each setting."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from ropesp.errors import ConfigError
from ropesp.settings import SECTIONS, RunConfig, Section, base_types, hints


def add_flags(
    parser: argparse.ArgumentParser,
    section: type[Section],
    *,
    only: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    defaults: Mapping[str, Any] | None = None,
    help: Mapping[str, str] | None = None,
) -> None:
    """The section's fields as flags of parser, in one argument group: every flag with its help line,
    choices, units and default. only/exclude: the fields this command takes; defaults/help: what this
    command says differently (a front end's own default, e.g. the demo's rolling window)."""
    group = parser.add_argument_group(section.title or section.__name__)
    types_ = hints(section)
    keep = set(only) if only is not None else set(section.names())
    defaults, help = dict(defaults or {}), dict(help or {})
    for f in dataclasses.fields(section):
        if f.name not in keep or f.name in exclude:
            continue
        meta, kinds = f.metadata, base_types(types_[f.name])
        default = defaults.get(f.name, f.default)
        text = help.get(f.name, meta.get("help", ""))
        flag = "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        if bool in kinds:
            if default is False:
                group.add_argument(flag, action="store_true", help=text, **kw)
            else:
                group.add_argument(
                    flag, action=argparse.BooleanOptionalAction, help=_with_default(text, default), **kw
                )
            continue
        if meta.get("parse") is not None:
            kw["type"] = _flag_parser(meta["parse"])
        elif int in kinds:
            kw["type"] = _flag_parser(int)
        elif float in kinds:
            kw["type"] = _flag_parser(float)
        if meta.get("choices"):
            kw["choices"] = [c for c in meta["choices"]]
        metavar = (
            meta.get("metavar")
            or meta.get("units")
            or ("N" if int in kinds else "X" if float in kinds else None)
        )
        if metavar is not None and "choices" not in kw:
            kw["metavar"] = metavar
        group.add_argument(flag, help=_with_default(text, default), **kw)
    added = tuple(f.name for f in dataclasses.fields(section) if f.name in keep and f.name not in exclude)
    declared = getattr(parser, "_ropesp_settings", ()) + added
    parser._ropesp_settings = (
        declared  # what given() reads back: a command's own option of the same name is not a setting
    )
    parser.set_defaults(_settings=declared)
    if defaults:
        parser.set_defaults(**{f"_default_{k}": v for k, v in defaults.items() if k in added})


def _with_default(text: str, default: Any) -> str:
    if default is None or default is False or "default" in text:
        return text
    shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
    return f"{text} (default: {shown})"


def _flag_parser(parse: typing.Callable[[str], Any]) -> typing.Callable[[str], Any]:
    """argparse's type= of a setting: a bad value is the usage error argparse prints for the flag."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except (ValueError, ConfigError) as exc:
            raise argparse.ArgumentTypeError(
                str(exc) if isinstance(exc, ConfigError) else f"invalid value {text!r}"
            ) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def given(args: argparse.Namespace, section: type[Section]) -> dict[str, Any]:
    """The section's settings the user gave on the command line, and a command's own defaults
    (add_flags(defaults=...)) for the ones not given."""
    values = {}
    declared = set(getattr(args, "_settings", ()))
    for name in section.names():
        if name not in declared:
            continue
        if name in vars(args):
            values[name] = getattr(args, name)
        elif f"_default_{name}" in vars(args):
            values[name] = getattr(args, f"_default_{name}")
    return values


def config_from_args(args: argparse.Namespace, base: RunConfig | None = None) -> RunConfig:
    """The RunConfig of parsed flags (every section; flags a command does not take keep their defaults)."""
    settings: dict[str, Any] = {}
    for cls in SECTIONS.values():
        settings.update(given(args, cls))
    return RunConfig.of(base, **settings)

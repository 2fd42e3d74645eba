"""Typed YAML configs with nested sections and ``key=value`` command-line overrides.

A config schema is a dataclass whose fields are section dataclasses (like ffcv-imagenet's
``data:``, ``lr:``, ``training:`` sections)::

    @dataclass
    class Optim:
        lr: float = 0.5

    @dataclass
    class Config:
        optim: Optim = field(default_factory=Optim)

Values come from, in order: the schema's defaults, the YAML file, the overrides
(``optim.lr=0.1``; a key that is unique across sections may omit its section: ``lr=0.1``).
Override values are parsed with YAML's rules (``true``, ``1e-4``, ``[1, 2]``, ``null``) and
checked against the field's type; unknown keys are errors that name the valid ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not match the schema."""


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` converted to ``tp`` where that is lossless, else raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_check_type(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # e.g. run.name=2024, which YAML reads as an int
    if (tp is int and isinstance(value, bool)) or not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")
    return value


def _unknown_key(key: str, where: str, valid: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    prefix = f"in section '{where}'" if where else "at the top level"
    return ConfigError(f"unknown config key '{key}' {prefix}.{hint} Valid keys: {', '.join(valid)}")


def _renamed(section: type, key: str, where: str) -> ConfigError | None:
    """A key a section no longer has, named in its ``RENAMED = {old: 'what to write instead'}`` attribute."""
    hint = getattr(section, "RENAMED", {}).get(key)
    if hint is None:
        return None
    return ConfigError(f"config key '{f'{where}.' if where else ''}{key}' no longer exists: {hint}")


def _merge(obj: Any, data: dict[str, Any], where: str = "") -> None:
    """Set the fields of dataclass ``obj`` from the nested mapping ``data`` (in place)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {data!r}")
    hints = _hints(type(obj))
    for key, value in data.items():
        if key not in hints:
            raise _renamed(type(obj), str(key), where) or _unknown_key(str(key), where, list(hints))
        name = f"{where}.{key}" if where else key
        if _is_section(hints[key]):
            _merge(getattr(obj, key), value, name)
        else:
            setattr(obj, key, _check_type(value, hints[key], name))


def _leaf_paths(cls: type, prefix: str = "") -> list[str]:
    paths = []
    for key, tp in _hints(cls).items():
        path = f"{prefix}{key}"
        paths.extend(_leaf_paths(tp, path + ".") if _is_section(tp) else [path])
    return paths


def _section_paths(cls: type, prefix: str = "") -> list[str]:
    paths = []
    for key, tp in _hints(cls).items():
        if _is_section(tp):
            paths += [f"{prefix}{key}", *_section_paths(tp, f"{prefix}{key}.")]
    return paths


def _resolve_path(cls: type, dotted: str) -> str:
    """Expand a dotted key, allowing the section to be omitted when the key name is unique.

    A whole section may be given too (``launch.pretrain={nodes: 1, gpus_per_node: 0}``): its keys
    are checked like the file's.
    """
    leaves = _leaf_paths(cls)
    if dotted in leaves or dotted in _section_paths(cls):
        return dotted
    section, _, key = dotted.rpartition(".")
    if section in _section_paths(cls):
        node = cls
        for part in section.split("."):
            node = _hints(node)[part]
        if (renamed := _renamed(node, key, section)) is not None:
            raise renamed
    matches = [p for p in leaves if p.endswith("." + dotted)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(f"config key '{dotted}' is ambiguous: write one of {', '.join(matches)}")
    close = difflib.get_close_matches(dotted, leaves, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"unknown config key '{dotted}'.{hint} Valid keys: {', '.join(leaves)}")


def parse_override(cls: type, text: str) -> dict[str, Any]:
    """``'optim.lr=0.1'`` -> ``{'optim': {'lr': 0.1}}`` (value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. optim.lr=0.1)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': value is not valid YAML ({e})") from e
    nested: dict[str, Any] = {}
    *sections, leaf = _resolve_path(cls, key.strip()).split(".")
    node = nested
    for s in sections:
        node = node.setdefault(s, {})
    node[leaf] = value
    return nested


def check_ranges(cfg: Any, ranges: dict[str, str]) -> None:
    """Raise a ConfigError for the first value of ``cfg`` outside its range.

    ``ranges`` maps dotted keys to ``'> 0'``, ``'>= 1'``, ``'< 1'``, ``'<= 1'`` or an interval ``'[0, 1)'``;
    numbers must also be finite (YAML reads ``.inf`` and ``.nan``).
    """
    import math

    for key, spec in ranges.items():
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if value is None:
            continue
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, not {value}")
        if not _within(value, spec):
            words = {">": "above", ">=": "at least", "<": "below", "<=": "at most"}
            op, _, bound = spec.partition(" ")
            wanted = f"{words[op]} {bound}" if op in words else f"in {spec}"
            raise ConfigError(f"{key} must be {wanted}, not {value}")


def _within(value: float, spec: str) -> bool:
    op, _, bound = spec.partition(" ")
    if op in (">", ">=", "<", "<="):
        b = float(bound)
        return {">": value > b, ">=": value >= b, "<": value < b, "<=": value <= b}[op]
    low, high = (float(x) for x in spec[1:-1].split(","))
    return (value >= low if spec[0] == "[" else value > low) and (value <= high if spec[-1] == "]" else value < high)


def require_file(path: str | Path, key: str, fix: str) -> Path:
    """``path`` if it is a file; else a ConfigError naming ``key``, whether it is missing or a folder, and ``fix``."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{key}: {path} is a folder, not a file; {fix}")
    if not path.is_file():
        raise ConfigError(f"{key}: {path} does not exist; {fix}")
    return path


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build a ``cls`` instance from defaults, the YAML file at ``path`` and ``overrides``."""
    cfg = cls()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        try:
            _merge(cfg, data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e
    for text in overrides:
        _merge(cfg, parse_override(cls, text))
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts/lists (YAML- and ``torch.load(weights_only=True)``-safe)."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    cfg = cls()
    _merge(cfg, data)
    return cfg


def dump_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (what the run actually used)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


class OverridesParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose ``key=value`` overrides and options come in any order (``run.dir=X --collect``):
    plain ``parse_args`` stops taking positionals at the first option after them and then rejects the rest
    as "unrecognized arguments". Every command line that takes overrides is built on it."""

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> argparse.Namespace:
        return self.parse_intermixed_args(args, namespace)


def argument_parser(description: str, prog: str | None = None, epilog: str | None = None
                    ) -> argparse.ArgumentParser:
    """An argparse parser with ``--config FILE`` and ``key=value`` overrides (before, between or after options)."""
    parser = OverridesParser(prog=prog, description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML config file (sections as in configs/); defaults apply without it")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override config values, e.g. optim.lr=0.1 data.batch_size=64 "
                             "(the section may be omitted when the key is unique)")
    return parser


def describe_keys(cls: type) -> str:
    """One line per config key with its default, for ``--help`` epilogs."""
    defaults = to_dict(cls())
    lines = []
    for path in _leaf_paths(cls):
        value: Any = defaults
        for part in path.split("."):
            value = value[part]
        lines.append(f"  {path} = {value!r}")
    return "\n".join(lines)

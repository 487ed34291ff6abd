"""Configs are data: one full default YAML per recipe family, small override files, ``key=value``.

A recipe family lives in ``configs/<family>/default.yaml`` and lists every key. An override file
holds only differences; it names its family with ``recipe: <family>`` or by living in
``configs/<family>/``. Merging is strict: a key that is not in the default is an error that names
the closest valid keys, so a typo never trains silently with a default value.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import sys
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from zoo.errors import UsageError

# Shipped with the package (package data), so an installed wheel finds its recipes.
CONFIG_DIR = Path(os.environ.get("ZOO_CONFIG_DIR", Path(__file__).resolve().parent / "configs"))
LEGACY_PREFIX = "configs/"  # configs lived at the repository's top level before they became package data


class ConfigError(UsageError):
    """A config file or override that cannot be applied; the message says what to change."""


def families() -> list[str]:
    return sorted(p.parent.name for p in CONFIG_DIR.glob("*/default.yaml"))


def default_config(family: str) -> dict[str, Any]:
    path = CONFIG_DIR / family / "default.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown recipe family {family!r}; known: {', '.join(families())}")
    return _read_yaml(path)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at top level, got {type(data).__name__}")
    return data


def _flat_keys(d: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k, v in d.items():
        keys.append(prefix + k)
        if isinstance(v, Mapping):
            keys.extend(_flat_keys(v, prefix + k + "."))
    return keys


def _unknown(key: str, base: Mapping[str, Any], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, _flat_keys(base), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; run `zoo info` or read the default YAML"
    return ConfigError(f"unknown config key {key!r} in {where}{hint}")


def merge(base: dict[str, Any], override: Mapping[str, Any], where: str, _prefix: str = "") -> dict[str, Any]:
    """Deep-merge ``override`` into a copy of ``base``; keys absent from ``base`` are errors."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        full = _prefix + k
        if k not in out:
            raise _unknown(full, _root_of(base, _prefix), where)
        if isinstance(out[k], dict):
            if not isinstance(v, Mapping):
                raise ConfigError(f"config key {full!r} in {where} is a section; give its keys, e.g. {full}.<key>")
            out[k] = merge(out[k], v, where, full + ".")
        elif isinstance(v, Mapping):
            raise ConfigError(f"config key {full!r} in {where} is a value, not a section; set it as {full}=<value>")
        else:
            out[k] = _coerce(out[k], v, full, where)
    return out


def _coerce(default: Any, value: Any, key: str, where: str) -> Any:
    """Numbers stay numbers: YAML 1.1 reads ``1e-4`` (no dot) as a string, and ``3`` as an int."""
    if isinstance(default, float) and not isinstance(value, bool):
        if isinstance(value, int):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"config key {key!r} in {where} needs a number, got {value!r}") from None
    if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"config key {key!r} in {where} needs an integer, got {value!r}") from None
    return copy.deepcopy(value)


def _root_of(base: Mapping[str, Any], prefix: str) -> Mapping[str, Any]:
    # Suggestions are computed over the section being merged, with its full dotted prefix.
    return {prefix + k: v for k, v in base.items()} if prefix else base


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["train.epochs=3", "data.dataset=bloodmnist"]`` -> nested dict; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.epochs=3)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        value = yaml.safe_load(raw) if raw.strip() else None
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {p!r}")
        node[parts[-1]] = value
    return out


def family_of(path: Path, data: Mapping[str, Any]) -> str:
    if "recipe" in data:
        return str(data["recipe"])
    if (path.parent / "default.yaml").is_file():
        return path.parent.name
    raise ConfigError(
        f"config {path} does not say which recipe family it overrides: add a line `recipe: <family>` "
        f"(families: {', '.join(families())})"
    )


def resolve_config_path(path: str | Path) -> Path:
    """A config named by path, or relative to the shipped configs (``medalmighty/cpu-fast.yaml``)."""
    p = Path(path)
    if p.is_file():
        return p
    q = CONFIG_DIR / p
    if q.is_file():
        return q
    rel = p.as_posix()
    if rel.startswith(LEGACY_PREFIX) and (CONFIG_DIR / rel[len(LEGACY_PREFIX):]).is_file():
        print(f"zoo: note: {rel} is now shipped with the package; name it {rel[len(LEGACY_PREFIX):]}",
              file=sys.stderr)
        return CONFIG_DIR / rel[len(LEGACY_PREFIX):]
    raise ConfigError(f"config file not found: {path} (looked in the working directory and {CONFIG_DIR})")


def load_config(
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    family: str | None = None,
    extra_files: Iterable[str | Path] = (),
) -> dict[str, Any]:
    """Resolve a config: family default <- override file(s) <- ``key=value`` overrides.

    Args:
        path: an override file (or a full config); ``None`` uses the family default alone.
        overrides: ``key=value`` strings, applied last.
        family: the recipe family when ``path`` is ``None``.
        extra_files: more override files applied after ``path`` (e.g. a zoo entry's pins).
    """
    files = [resolve_config_path(p) for p in ([path] if path is not None else []) + list(extra_files)]
    datas = [_read_yaml(p) for p in files]
    if family is None:
        if not files:
            raise ConfigError("load_config needs a config file or a recipe family")
        family = family_of(files[0], datas[0])
    cfg = default_config(family)
    for p, d in zip(files, datas):
        cfg = merge(cfg, d, str(p))
    cfg = merge(cfg, parse_overrides(overrides), "command-line overrides")
    return cfg


def dump_config(cfg: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(cfg), sort_keys=False)


def explicit_values(files: Iterable[str | Path] = (), overrides: Iterable[str] = ()) -> dict[str, Any]:
    """What override files and ``key=value`` strings set, as ``{dotted key: value}`` (later ones win).

    A build compares these with its entry's pins: a value the user asked for that contradicts the
    entry is refused, while recipe defaults that differ from a pin are simply replaced by it.
    """
    out: dict[str, Any] = {}

    def flatten(d: Mapping[str, Any], prefix: str = "") -> None:
        for k, v in d.items():
            if isinstance(v, Mapping):
                flatten(v, prefix + k + ".")
            else:
                out[prefix + k] = v

    for f in files:
        data = _read_yaml(resolve_config_path(f))
        data.pop("recipe", None)
        flatten(data)
    flatten(parse_overrides(overrides))
    return out


def set_value(cfg: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key in a resolved config (the key must exist, as in :func:`merge`)."""
    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    if leaf not in node:
        raise ConfigError(f"unknown config key {key!r}")
    node[leaf] = copy.deepcopy(value)


def get_value(cfg: Mapping[str, Any], key: str) -> Any:
    node: Any = cfg
    for p in key.split("."):
        node = node[p]
    return node


# ----------------------------------------------------------------------------------------- typed sections

T = TypeVar("T")


def check(condition: bool, key: str, message: str) -> None:
    """A range check of a typed section: ``ConfigError("<key> <message>")`` when ``condition`` fails."""
    if not condition:
        raise ConfigError(f"{key} {message}")


def typed(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """A frozen config dataclass from a resolved config section, every value checked against its type.

    Types are read from the dataclass annotations: ``int`` (a whole number, not a bool), ``float``
    (any number, not a bool), ``bool`` (``true``/``false`` only), ``str``, ``Literal[...]`` (one of
    its values), ``X | None``, ``tuple[X, ...]`` / ``list[X]`` and nested dataclasses. Keys must match
    the dataclass fields exactly, so a section and its YAML cannot drift apart silently. Range checks
    live in the dataclasses' ``__post_init__`` (with :func:`check`). Errors are one-line
    :class:`ConfigError` messages naming the dotted key and the value.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"config key {prefix.rstrip('.') or 'config'!r} must be a section (key: value lines), "
                          f"got {data!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    extra = sorted(set(data) - set(names))
    missing = [n for n in names if n not in data]
    if extra or missing:
        raise ConfigError(f"config section {prefix.rstrip('.') or '<top>'!r} does not match {cls.__name__}: "
                          f"unexpected {extra}, missing {missing}")
    kw = {n: _coerce_typed(hints[n], data[n], prefix + n) for n in names}
    return cls(**kw)


def _coerce_typed(tp: Any, v: Any, key: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return typed(tp, v, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if v is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce_typed(a, v, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key} has an invalid value {v!r}")
    if origin is Literal:
        choices = get_args(tp)
        if v not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}, got {v!r}")
        return v
    if origin in (tuple, list):
        args = get_args(tp)
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {v!r}")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(v) != len(args):
                raise ConfigError(f"{key} must be a list of {len(args)} values, got {v!r}")
            return tuple(_coerce_typed(a, x, f"{key}[{i}]") for i, (a, x) in enumerate(zip(args, v)))
        item = args[0] if args else Any
        out = [_coerce_typed(item, x, f"{key}[{i}]") for i, x in enumerate(v)]
        return tuple(out) if origin is tuple else out
    if tp is Any:
        return v
    if tp is bool:
        if not isinstance(v, bool):
            raise ConfigError(f"{key} must be true or false, got {v!r}")
        return v
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
            raise ConfigError(f"{key} must be a whole number, got {v!r}")
        return int(v)
    if tp is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{key} must be a number, got {v!r}")
        if v != v:  # NaN
            raise ConfigError(f"{key} must be a number, got NaN")
        return float(v)
    if tp is str:
        if not isinstance(v, str):
            raise ConfigError(f"{key} must be a string, got {v!r}")
        return v
    raise TypeError(f"typed(): unsupported annotation {tp!r} for {key}")

"""Dataclass configs for every subcommand: YAML files, command-line flags and dotted ``key=value`` overrides.

One mechanism serves every subcommand (litgpt / torchtune style): a subcommand describes its settings as a
dataclass whose fields carry help text in ``metadata["help"]``; :func:`add_config_arguments` turns the fields
into ``--flags`` and :func:`resolve_config` merges, in this order, the dataclass defaults, ``--config
FILE.yaml``, the flags the user typed, and ``key=value`` overrides. Nested dataclasses are addressed with
dots (``lora.r=16``). An unknown key is an error that lists the valid keys.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from finechat.errors import ConfigError

VERSION = "0.1.0"  # finechat's own version (pyproject.toml says the same); recorded in every run file


def _field_help(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "") if f.metadata else ""


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def valid_keys(cls: type, prefix: str = "") -> list[str]:
    """All dotted keys a config dataclass accepts."""
    keys = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _strip_optional(hints[f.name])
        if _is_dataclass_type(tp):
            keys.extend(valid_keys(tp, prefix + f.name + "."))
        else:
            keys.append(prefix + f.name)
    return keys


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise ConfigError naming the key."""
    tp, optional = _strip_optional(tp)
    # YAML's null, or the words none / null on the command line (key=null); for an optional string too, so
    # `val_file=null` unsets the file instead of naming one called "null"
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and (tp is not str or optional)):
        if optional or tp is Any:
            return None
        raise ConfigError(f"{key}: a value is required")
    origin = get_origin(tp)
    try:
        if tp is Any:
            return value
        if origin is Literal:
            choices = get_args(tp)
            for c in choices:
                if value == c or (isinstance(value, str) and str(c) == value):
                    return c
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
                return False
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        if tp is int:
            if isinstance(value, bool):
                raise ConfigError(f"{key}: expected an integer, got {value!r}")
            if isinstance(value, float) and not value.is_integer():
                raise ConfigError(f"{key}: expected an integer, got {value!r}")
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ConfigError(f"{key}: expected a number, got {value!r}")
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ConfigError(f"{key}: expected text, got {type(value).__name__}")
            return str(value)
        if origin in (list, tuple) or tp in (list, tuple):
            (inner,) = get_args(tp)[:1] or (Any,)
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()] if value else []
            if not isinstance(value, (list, tuple)):
                value = [value]
            return [coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        if origin is dict or tp is dict:
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping, got {value!r}")
            return dict(value)
        if origin in (Union, types.UnionType):
            for arg in get_args(tp):
                try:
                    return coerce(value, arg, key)
                except (ConfigError, ValueError, TypeError):
                    continue
            raise ConfigError(f"{key}: {value!r} does not fit {tp}")
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{key}: cannot read {value!r} as {getattr(tp, '__name__', tp)}") from e
    return value


def _set_dotted(cls: type, data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    cur_cls, cur = cls, data
    for i, part in enumerate(parts):
        hints = get_type_hints(cur_cls)
        names = {f.name for f in dataclasses.fields(cur_cls)}
        if part not in names:
            keys = valid_keys(cls)
            close = difflib.get_close_matches(key, keys, n=1, cutoff=0.75)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"unknown config key {key!r}; {hint}valid keys: {', '.join(keys)}")
        tp, _ = _strip_optional(hints[part])
        if i == len(parts) - 1:
            if _is_dataclass_type(tp):
                if not isinstance(value, dict):
                    raise ConfigError(f"{key}: expected a mapping of {', '.join(valid_keys(tp))}")
                for k, v in value.items():
                    _set_dotted(cls, data, f"{key}.{k}", v)
                return
            cur[part] = coerce(value, hints[part], key)
            return
        if not _is_dataclass_type(tp):
            raise ConfigError(f"unknown config key {key!r}; {'.'.join(parts[: i + 1])} has no sub-keys")
        cur = cur.setdefault(part, {})
        cur_cls = tp


def _build(cls: type, data: dict) -> Any:
    hints = get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp, _ = _strip_optional(hints[f.name])
        kwargs[f.name] = _build(tp, data[f.name]) if _is_dataclass_type(tp) else data[f.name]
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from e


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    return data


def _flatten(data: dict, prefix: str = "") -> list[tuple[str, Any]]:
    return [(prefix + k, v) for k, v in data.items()]


def resolve_config(
    cls: type,
    config_file: str | Path | None = None,
    flags: dict | None = None,
    overrides: list[str] | None = None,
    base: dict | None = None,
) -> Any:
    """Build a ``cls`` instance from defaults < base < YAML file < flags < ``key=value`` overrides."""
    data: dict = {}
    for k, v in _flatten(base or {}):
        _set_dotted(cls, data, k, v)
    if config_file:
        for k, v in _flatten(load_yaml(config_file)):
            try:
                _set_dotted(cls, data, k, v)
            except ConfigError as e:
                raise ConfigError(f"{config_file}: {e}") from e
    for k, v in (flags or {}).items():
        _set_dotted(cls, data, k, v)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"expected key=value, got {item!r}; valid keys: {', '.join(valid_keys(cls))}")
        k, raw = item.split("=", 1)
        try:
            v = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            v = raw
        if isinstance(v, (int, float, bool)) or v is None:
            # keep the user's spelling for text fields ("1e-4" stays parseable, "007" stays text)
            hints = _lookup_type(cls, k)
            if hints is str:
                v = raw
        _set_dotted(cls, data, k.strip(), v)
    return _build(cls, data)


def _lookup_type(cls: type, key: str) -> Any:
    cur = cls
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not _is_dataclass_type(cur):
            return None
        hints = get_type_hints(cur)
        if part not in hints:
            return None
        tp, _ = _strip_optional(hints[part])
        if i == len(parts) - 1:
            return tp
        cur = tp
    return None


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add ``--config``, one ``--flag`` per top-level scalar field of ``cls``, and ``key=value`` overrides.

    Flags default to ``argparse.SUPPRESS`` so that only what the user typed overrides the config file.
    """
    parser.add_argument("--config", metavar="FILE.yaml", help="read settings from a YAML file")
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp, _ = _strip_optional(hints[f.name])
        if _is_dataclass_type(tp):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = _field_help(f)
        if default not in (None, "", []) and not isinstance(default, bool):
            help_text += f" (default: {default})"
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif get_origin(tp) is Literal:
            kw["choices"] = [str(c) for c in get_args(tp)]
            kw["metavar"] = "{" + ",".join(str(c) for c in get_args(tp)) + "}"
        elif tp in (int, float):
            kw["type"] = tp
        elif get_origin(tp) in (list, tuple):
            kw["metavar"] = "A,B"
        # also accept the underscore spelling users type from transformers / ChatGLM scripts (--learning_rate)
        spellings = [flag] + (["--" + f.name] if "_" in f.name else [])
        parser.add_argument(*spellings, **kw)
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="override any config key, e.g. max_new_tokens=64"
    )


def config_from_args(cls: type, args: argparse.Namespace, extra_flags: dict | None = None) -> Any:
    """Resolve a config from the Namespace produced by a parser built with :func:`add_config_arguments`."""
    names = {f.name for f in dataclasses.fields(cls)}
    flags = {k: v for k, v in vars(args).items() if k in names}
    flags.update(extra_flags or {})
    return resolve_config(cls, getattr(args, "config", None), flags, getattr(args, "overrides", None))


def to_dict(cfg: Any) -> dict:
    """A plain, YAML/JSON-safe dict of a config dataclass (for saving beside checkpoints)."""
    return dataclasses.asdict(cfg)


def field(default: Any = dataclasses.MISSING, help: str = "", **kw: Any) -> Any:  # noqa: A002
    """``dataclasses.field`` with help text; mutable defaults are wrapped in a factory."""
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: typing.cast(Any, value).copy(), metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


def finechat_home() -> Path:
    """The cache folder: $FINECHAT_HOME, else ~/.cache/finechat."""
    return Path(os.environ.get("FINECHAT_HOME") or Path.home() / ".cache" / "finechat").expanduser()

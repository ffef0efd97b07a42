"""The Train tab's form, generated from :class:`TrainConfig`'s own fields and help, and the run it describes.

The page holds no copy of the config: :func:`form_schema` walks the dataclass fields (recursively, so a config
regrouped into nested dataclasses with the same flat YAML keys gives the same form), and :func:`build_run`
checks the values with the config's own machinery (:func:`finechat.config.resolve_config` and the
dataclasses' ``__post_init__``) before anything is written. The board's only additions are which fields name
paths (they are confined to the workspace) and which ones the form shows first.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from finechat.config import load_yaml, resolve_config
from finechat.errors import ConfigError
from finechat.serve.board.workspace import Workspace
from finechat.serve.schemas import ApiError
from finechat.train.train_config import TrainConfig

# Shown first, in this order; the rest sit under "more settings". Presentation only: names, not rules.
COMMON = ("model", "method", "stage", "data", "output_dir", "max_steps", "num_train_epochs", "learning_rate",
          "per_device_train_batch_size", "gradient_accumulation_steps", "cutoff_len", "val_size", "lora_rank",
          "lora_alpha", "pre_seq_len", "template", "logging_steps", "save_steps", "eval_steps", "max_samples")
# Fields that name files or folders: resolved inside the workspace (values like 'default' / 'auto' are words).
PATH_FIELDS = {"model": ("default",), "adapter": (), "data": (), "val_file": (), "predict_file": (),
               "output_dir": (), "resume_from_checkpoint": ("auto",), "reward_model": (), "fsdp_config": (),
               "deepspeed": ()}


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def iter_fields(cls: type = TrainConfig, group: str = "") -> typing.Iterator[tuple[dataclasses.Field, Any, str]]:
    """(field, type, group) of every leaf field, nested dataclasses walked in order (their keys stay flat).

    The group is the nested field's name, or for a config mixed from group classes (``class
    TrainConfig(OutputSettings, ..., ModelSettings)``) the class that declares the field (``model``).
    """
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _strip_optional(hints[f.name])
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            yield from iter_fields(tp, f.name)
        else:
            yield f, hints[f.name], group or _declared_in(cls, f.name)


def config_key(f: dataclasses.Field, cls: type = TrainConfig) -> str:
    """A field's key in YAML and overrides: flat, or dotted under its nested group (``distributed.strategy``)."""
    hints = get_type_hints(cls)
    for top in dataclasses.fields(cls):
        tp, _ = _strip_optional(hints[top.name])
        if isinstance(tp, type) and dataclasses.is_dataclass(tp) and any(f is g for g in dataclasses.fields(tp)):
            return f"{top.name}.{f.name}"
    return f.name


def _declared_in(cls: type, name: str) -> str:
    """The group class (a base of ``cls``) that declares field ``name``, as a short lowercase name."""
    for base in cls.__mro__[1:]:
        if name in base.__dict__.get("__annotations__", {}) and dataclasses.is_dataclass(base):
            return re.sub(r"(Settings|Options|Args|Config)$", "", base.__name__).lower()
    return ""


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _kind(tp: Any) -> tuple[str, list | None]:
    inner, _ = _strip_optional(tp)
    if get_origin(inner) is Literal:
        return "choice", [str(c) for c in get_args(inner)]
    if inner is bool:
        return "bool", None
    if inner is int:
        return "int", None
    if inner is float:
        return "float", None
    if get_origin(inner) in (list, tuple) or inner in (list, tuple):
        return "list", None
    if get_origin(inner) is dict or inner is dict:
        return "dict", None
    return "text", None


def form_schema() -> dict:
    """The form: one entry per config field (key, kind, choices, default, help, group, optional, path)."""
    fields = []
    for f, tp, group in iter_fields():
        kind, choices = _kind(tp)
        _, optional = _strip_optional(tp)
        fields.append({"key": config_key(f), "kind": kind, "choices": choices, "default": _default(f),
                       "help": f.metadata.get("help", "") if f.metadata else "", "group": group,
                       "optional": optional, "path": f.name in PATH_FIELDS, "common": f.name in COMMON})
    order = {k: i for i, k in enumerate(COMMON)}
    groups = list(dict.fromkeys(f["group"] for f in fields))  # the config's own group order
    fields.sort(key=lambda x: (not x["common"], order.get(x["key"], 0) if x["common"] else groups.index(x["group"])))
    return {"fields": fields}


def field_of(message: str, keys: list[str]) -> str | None:
    """The config key an error message is about (its first word that is a key), for the page to mark."""
    for word in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", message):
        if word in keys:
            return word
    return None


def _changed(values: dict) -> dict:
    """The values that differ from the defaults (what the YAML needs to say), in the form's order."""
    defaults = {config_key(f): _default(f) for f, _, _ in iter_fields()}
    return {k: v for k, v in values.items() if k in defaults and v != defaults[k]}


@dataclasses.dataclass
class RunPlan:
    """A checked run: the config, its YAML, where it goes, and the command line that runs it."""

    config: TrainConfig
    values: dict  # the YAML's keys and values (paths relative to the workspace)
    yaml_text: str
    output_dir: Path
    argv: list[str]  # after `finechat`

    def command(self, yaml_path: str) -> str:
        """The command as a person would type it in the workspace (shown, never run through a shell)."""
        return "finechat " + " ".join(shlex.quote(a) for a in self.argv_for(yaml_path))

    def argv_for(self, yaml_path: str) -> list[str]:
        return ["train", yaml_path]


def build_run(values: Any, ws: Workspace) -> RunPlan:
    """Check the form's ``values`` (a JSON object of config keys) into a :class:`RunPlan`, or a 422 naming the
    field; nothing is written."""
    if not isinstance(values, dict):
        raise ApiError(422, "config: expected an object of config keys", param="config", code="invalid_value")
    keys = [config_key(f) for f, _, _ in iter_fields()]
    unknown = [k for k in values if k not in keys]
    if unknown:
        raise ApiError(422, f"{unknown[0]}: not a training setting", param=unknown[0], code="unknown_field")
    values = {k: v for k, v in values.items() if v is not None and v != ""}
    for key, words in PATH_FIELDS.items():
        if key in values:
            items = values[key] if isinstance(values[key], list) else [values[key]]
            for item in items:
                if isinstance(item, str) and item not in words:
                    must = key not in ("output_dir",)
                    ws.resolve(item, key, must_exist=must)
    try:
        cfg = resolve_config(TrainConfig, base=values)
    except ConfigError as e:
        message = str(e)
        param = field_of(message, keys)
        raise ApiError(422, message, param=param, code="invalid_value") from None
    if not values.get("output_dir"):
        raise ApiError(422, "output_dir: choose the run's output folder (e.g. runs/lora-1)", param="output_dir",
                       code="invalid_value")
    if not cfg.data and cfg.stage != "grpo":
        raise ApiError(422, "data: choose a training file (upload one in the Data tab)", param="data",
                       code="invalid_value")
    out = ws.resolve(cfg.output_dir, "output_dir")
    written = {k: _plain(v) for k, v in _changed(flat_values(cfg)).items()}
    text = yaml.safe_dump(written, allow_unicode=True, sort_keys=False)
    return RunPlan(cfg, written, text, out, ["train"])


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def flat_values(cfg: Any) -> dict:
    """A config's values by key (flat; a nested group's fields dotted, as overrides name them), for the form."""
    out = {}

    def walk(obj: Any, prefix: str = "") -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                walk(value, f"{prefix}{f.name}.")
            else:
                out[prefix + f.name] = value
    walk(cfg)
    return out


def list_recipes(folder: Path | None) -> list[dict]:
    """Single-run recipes (``recipes/*.yaml``) the form can start from; multi-stage ones are left out."""
    if folder is None or not folder.is_dir():
        return []
    out = []
    for path in sorted(folder.glob("*.yaml")):
        try:
            data = load_yaml(path)
        except ConfigError:
            continue
        if "stages" in data:
            continue
        out.append({"name": path.stem, "values": data})
    return out


def default_recipes_folder() -> Path | None:
    """``recipes/`` of the working folder, else of the source checkout finechat runs from."""
    for candidate in (Path.cwd() / "recipes", Path(__file__).resolve().parents[4] / "recipes"):
        if candidate.is_dir():
            return candidate
    return None


def shipped_tasks_folder() -> Path | None:
    """The project's lm-eval task files (``data/tasks``) of the working folder, else of the source checkout."""
    for candidate in (Path.cwd() / "data" / "tasks", Path(__file__).resolve().parents[4] / "data" / "tasks"):
        if candidate.is_dir():
            return candidate
    return None


def python_argv(args: list[str]) -> list[str]:
    """``finechat ARGS`` as an argument list for this interpreter (no shell, no PATH lookup)."""
    return [sys.executable, "-m", "finechat", *args]

"""The board's workspace folder: every path a form names is resolved inside it, or refused naming the field.

A path from the page is relative to the workspace (``data/train.jsonl``, ``runs/lora-1``). It is refused with
a 422 naming the field when it is absolute, contains ``..``, or resolves (symbolic links followed) outside
the workspace. Uploads land in ``data/`` through :func:`finechat.files.atomic_file`, so a failed upload
leaves nothing half-written.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from finechat.config import finechat_home
from finechat.files import atomic_file, staged_folder
from finechat.serve.schemas import ApiError

DATA_DIR, RUNS_DIR, EVALS_DIR, EXPORTS_DIR, MODELS_DIR = "data", "runs", "evals", "exports", "models"
NAME_RE = re.compile(r"^[A-Za-z0-9\u4e00-\u9fff][\w.\-\u4e00-\u9fff]{0,99}$")
UPLOAD_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".txt")


def default_workspace(given: str | None = None) -> str:
    """``given``, else ``$FINECHAT_HOME/board`` when FINECHAT_HOME is set, else ``./finechat-board``."""
    return given or (str(finechat_home() / "board") if os.environ.get("FINECHAT_HOME") else "finechat-board")


class Workspace:
    """A folder the board reads and writes in; nothing outside it is reachable from the page."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        for sub in (DATA_DIR, RUNS_DIR, EVALS_DIR, EXPORTS_DIR, MODELS_DIR):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def resolve(self, value: str, param: str, must_exist: bool = False) -> Path:
        """``value`` (relative to the workspace) as an absolute path inside it, else a 422 naming ``param``."""
        if not isinstance(value, str) or not value.strip():
            raise ApiError(422, f"{param}: give a path inside the workspace", param=param, code="invalid_path")
        text = value.strip()
        if "\x00" in text:
            raise ApiError(422, f"{param}: the path contains a NUL byte", param=param, code="invalid_path")
        raw = Path(text)
        if raw.is_absolute() or text.startswith("~"):
            raise ApiError(422, f"{param}: {text!r} is an absolute path; give a path inside the workspace "
                                f"(relative to {self.root})", param=param, code="path_outside_workspace")
        if ".." in raw.parts:
            raise ApiError(422, f"{param}: {text!r} contains '..'; give a path inside the workspace",
                           param=param, code="path_outside_workspace")
        path = (self.root / raw).resolve()  # follows symbolic links: one pointing out is caught below
        if path != self.root and self.root not in path.parents:
            raise ApiError(422, f"{param}: {text!r} leads outside the workspace (a symbolic link?)",
                           param=param, code="path_outside_workspace")
        if must_exist and not path.exists():
            raise ApiError(422, f"{param}: {text!r} does not exist in the workspace", param=param,
                           code="not_found")
        return path

    def relative(self, path: str | Path) -> str:
        """``path`` as the page shows it: relative to the workspace."""
        try:
            return Path(path).resolve().relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    def check_name(self, name: str, param: str) -> str:
        """A folder or file name chosen on the page: letters, digits, '.', '-', '_' (no separators)."""
        if not isinstance(name, str) or not NAME_RE.match(name) or name in (".", ".."):
            raise ApiError(422, f"{param}: {name!r} is not a usable name (letters, digits, '.', '-' and '_', "
                                "at most 100 characters)", param=param, code="invalid_name")
        return name

    def save_upload(self, name: str, content: str, replace: bool = False) -> Path:
        """Write an uploaded data file into ``data/`` (atomic: complete or absent)."""
        self.check_name(name, "name")
        if Path(name).suffix.lower() not in UPLOAD_SUFFIXES:
            raise ApiError(422, f"name: {name!r}: upload a data file ending in {', '.join(UPLOAD_SUFFIXES)}",
                           param="name", code="unknown_format")
        path = self.resolve(f"{DATA_DIR}/{name}", "name")
        if path.exists() and not replace:
            raise ApiError(409, f"name: data/{name} already exists; choose another name or replace it",
                           param="name", code="exists")
        with atomic_file(path) as fh:
            fh.write(content)
        return path

    def add_samples(self, samples: Path, name: str = "samples") -> None:
        """Copy the project's sample data (``data/samples``, ~1 MB) into ``data/samples`` once, so that the
        recipes, which name those files, run in the workspace as they are; likewise its lm-eval task files
        (``data/tasks``, whose data paths are relative to ``data/tasks``' parent) into ``data/tasks``."""
        target = self.root / DATA_DIR / name
        if target.exists() or not samples.is_dir():
            return
        with staged_folder(target) as staged:
            shutil.copytree(samples, staged, dirs_exist_ok=True, symlinks=False)

    def list_files(self, sub: str = DATA_DIR) -> list[dict]:
        """The data files under ``sub`` (path, bytes), links that lead outside left out."""
        base = self.root / sub
        out = []
        for path in sorted(base.rglob("*")):
            if not path.is_file() or path.name.startswith("."):
                continue
            real = path.resolve()
            if self.root not in real.parents:
                continue
            out.append({"path": self.relative(path), "bytes": path.stat().st_size})
        return out

    def list_models(self) -> list[str]:
        """'default' and the model folders under ``models/`` (a folder with a config.json, or a .gguf file)."""
        found = ["default"]
        base = self.root / MODELS_DIR
        for path in sorted(base.iterdir()):
            if path.is_dir() and (path / "config.json").is_file() or path.suffix == ".gguf":
                found.append(self.relative(path))
        return found


def folder_size(path: Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += (Path(root) / name).stat().st_size
            except OSError:
                continue
    return total

"""Writing files and folders so that a crash, a full disk or a kill never leaves half of one behind.

Every output finechat writes (converted models, exports, checkpoints, data files, GGUF files) is first written
to a temporary name in the *target* folder (same file system, so the final rename is atomic), flushed, and then
renamed into place; on any error the temporary is removed and a previous output of the same name is untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from finechat.errors import FinechatError, ModelLoadError


def fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder`` and the folder itself to disk."""
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def same_file(a: str | Path, b: str | Path) -> bool:
    """True when ``a`` and ``b`` are the same file on disk (hard links and symlinks included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_output_path(out: str | Path, *inputs: str | Path | None, force: bool = True) -> Path:
    """Refuse an output path that is a folder, one of the inputs (by identity, not by spelling: a hard link or a
    symlink to an input is the input), or, without ``force``, an existing file."""
    out = Path(out).expanduser()
    if out.is_dir():
        raise FinechatError(f"{out} is a folder; give a file name to write")
    for path in inputs:
        if path is not None and (same_file(out, path) or out.resolve() == Path(path).expanduser().resolve()):
            raise FinechatError(f"{out} is the input file {path}; choose another output path")
    if not force and out.exists():
        raise FinechatError(f"{out} exists; choose another name or pass --force to replace it")
    return out


def check_output_folder(out: str | Path, *inputs: str | Path | None) -> Path:
    """Refuse an output folder that is a file, or that is one of the inputs or holds one (replacing it would
    delete the input); compared by identity, so a symlink or another spelling of the input is the input."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise FinechatError(f"{out} is a file; give a folder to write")
    if not out.exists():
        return out
    for path in inputs:
        if path is None or not Path(path).expanduser().exists():
            continue
        path = Path(path).expanduser()
        around = {q for p in (path.absolute(), path.resolve()) for q in (p, *p.parents)}
        if any(same_file(out, p) for p in around):
            raise FinechatError(f"{out} is the input {path} or holds it; choose another output folder")
    return out


def _write_error(path: Path, e: OSError) -> FinechatError:
    """One line for a failed write: which output, why, and the file the system named when it is another."""
    where = f" ({e.filename})" if e.filename and str(e.filename) != str(path) else ""
    return FinechatError(f"cannot write {path}: {e.strerror or e}{where}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to (also for writers that open files by name, such as the
    ``gguf`` package's); on success it is flushed and renamed over ``path``, on error it is removed.

    Any OSError (full disk, read-only folder, a folder in the way) becomes a one-line FinechatError."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise FinechatError(f"cannot write {path}: it is a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise _write_error(path, e) from e
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        if path.exists():  # keep the old file's permissions (mkstemp makes 0600)
            shutil.copymode(path, tmp)
        else:
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        raise _write_error(path, e) from e
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w", encoding: str | None = "utf-8",
                newline: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success flush it and rename it over ``path``.

    Any OSError (full disk, read-only folder, a folder in the way) becomes a one-line FinechatError."""
    if "b" in mode:
        encoding = newline = None
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding, newline=newline) as fh:
        yield fh


def write_text_atomic(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` (UTF-8) atomically: the ``Path.write_text`` of outputs."""
    with atomic_file(path, encoding=encoding) as fh:
        fh.write(text)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` atomically: the ``Path.write_bytes`` of outputs."""
    with atomic_file(path, "wb") as fh:
        fh.write(data)


def write_jsonl_atomic(path: str | Path, rows: Any) -> int:
    """Write one JSON object a line (UTF-8) atomically; returns the number of lines."""
    count = 0
    with atomic_file(path) as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def _umask() -> int:
    """The process umask, read without setting it (os.umask would change it for every thread meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON (indented, UTF-8) atomically."""
    with atomic_file(path) as fh:
        json.dump(data, fh, indent=2, ensure_ascii=False, default=str)
        fh.write("\n")


@contextlib.contextmanager
def staged_folder(final: str | Path, staging: str | Path | None = None) -> Iterator[Path]:
    """A temporary folder beside ``final``; on success it is flushed and replaces ``final`` (an old one is
    removed only then), on error it is deleted and ``final`` stays as it was."""
    final = Path(final).expanduser()
    if final.exists() and not final.is_dir():
        raise FinechatError(f"cannot write {final}: it is a file, not a folder")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        if staging is None:
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        else:
            tmp = Path(staging)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
    except OSError as e:
        raise _write_error(final, e) from e
    try:
        yield tmp
        publish_folder(tmp, final)
    except OSError as e:
        raise _write_error(final, e) from e
    except Exception as e:
        # Writers in other languages wrap the OSError: safetensors raises SafetensorError("Error while
        # serializing: I/O error: No space left on device (os error 28)").
        if "I/O error" not in str(e) and "(os error" not in str(e):
            raise
        raise FinechatError(f"cannot write {final}: {str(e).rsplit('I/O error: ', 1)[-1]}") from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish_folder(staged: Path, final: Path) -> None:
    """Flush ``staged`` and rename it to ``final``, replacing an existing ``final``."""
    fsync_tree(staged)
    if final.exists():
        doomed = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, doomed)  # rename first: a kill during rmtree never leaves a half-deleted output
        os.replace(staged, final)
        shutil.rmtree(doomed, ignore_errors=True)
    else:
        os.replace(staged, final)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: cannot read JSON: {e}") from e

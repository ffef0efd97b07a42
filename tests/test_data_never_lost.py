"""Data and export outputs are written through a temporary file renamed into place: a full disk, a folder or a
link to the input as the target gives one line and a non-zero exit, and never harms the input or an old output."""

import errno
import io
import os
from pathlib import Path

import pytest

from finechat.cli import main as cli
from finechat.errors import FinechatError
from finechat.files import atomic_file, check_output_folder, check_output_path

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "data" / "samples"
GRAPH = SAMPLES / "medical" / "graph.json"


def one_line_error(capsys, *words):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, err
    return err


class FullDisk(io.TextIOBase):
    """A writable file on a disk that fills up after ``room`` characters (the write raises ENOSPC)."""

    def __init__(self, real, room):
        self.real, self.room = real, room

    def write(self, text):
        if len(text) > self.room:
            self.real.write(text[:self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(text)
        return self.real.write(text)

    def __getattr__(self, name):
        return getattr(self.real, name)

    def close(self):
        self.real.close()


@pytest.fixture()
def full_disk(monkeypatch, tmp_path):
    """Every file opened for writing under tmp_path sits on a disk with 200 characters left."""
    real_open, real_fdopen = io.open, os.fdopen

    def wrap(handle, mode):
        return FullDisk(handle, 200) if any(c in str(mode) for c in "wax") and "b" not in str(mode) else handle

    def fake_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        return wrap(handle, mode) if str(tmp_path) in str(file) else handle

    def fake_fdopen(fd, mode="r", *args, **kwargs):
        return wrap(real_fdopen(fd, mode, *args, **kwargs), mode)

    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr("builtins.open", fake_open)
    monkeypatch.setattr(os, "fdopen", fake_fdopen)


def test_convert_on_a_full_disk_keeps_the_old_output(tmp_path, full_disk, capsys):
    out = tmp_path / "out.jsonl"
    out.write_text("the good old output\n", encoding="utf-8")
    assert cli(["data", "convert", str(SAMPLES / "dolly.jsonl"), "--to", "sharegpt", str(out)]) == 2
    one_line_error(capsys, str(out), "No space left on device")
    assert out.read_text(encoding="utf-8") == "the good old output\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]  # no temporary left behind


@pytest.mark.parametrize("command", [
    ["data", "generate", "adgen", "--n", "50", "--out", "{out}"],
    ["data", "from-kg", str(GRAPH), "--out", "{out}"],
])
def test_generate_and_from_kg_on_a_full_disk_keep_the_old_output(tmp_path, full_disk, capsys, command):
    out = tmp_path / "out.jsonl"
    out.write_text("old\n", encoding="utf-8")
    assert cli([c.replace("{out}", str(out)) for c in command]) == 2
    one_line_error(capsys, str(out), "No space left on device")
    assert out.read_text(encoding="utf-8") == "old\n"


def test_output_through_a_hard_link_or_symlink_to_the_input_is_refused(tmp_path, capsys):
    data = tmp_path / "in.jsonl"
    data.write_bytes((SAMPLES / "dolly.jsonl").read_bytes())
    before = data.read_bytes()
    hard, soft = tmp_path / "hard.jsonl", tmp_path / "soft.jsonl"
    os.link(data, hard)
    soft.symlink_to(data)
    for out in (hard, soft, tmp_path / "sub" / ".." / "in.jsonl"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        assert cli(["data", "convert", str(data), "--to", "alpaca", str(out)]) == 2
        one_line_error(capsys, "is the input file")
    graph = tmp_path / "graph.json"
    graph.write_bytes(GRAPH.read_bytes())
    os.link(graph, tmp_path / "graph-link.json")
    assert cli(["data", "from-kg", str(graph), "--out", str(tmp_path / "graph-link.json")]) == 2
    one_line_error(capsys, "is the input file")
    assert cli(["data", "from-kg", str(graph), "--out", str(tmp_path / "qa.jsonl"), "--holdout", "0.2",
                "--holdout-out", str(tmp_path / "qa.jsonl")]) == 2
    one_line_error(capsys, "qa.jsonl", "three files")
    assert data.read_bytes() == before and graph.read_bytes() == GRAPH.read_bytes()
    assert not (tmp_path / "qa.jsonl").exists()  # refused before anything was written


def test_a_folder_as_the_target_is_one_line(tmp_path, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    for command in (["data", "convert", str(SAMPLES / "dolly.jsonl"), "--to", "alpaca", str(folder)],
                    ["data", "generate", "adgen", "--n", "3", "--out", str(folder)],
                    ["data", "from-kg", str(GRAPH), "--out", str(folder)],
                    ["data", "from-kg", str(GRAPH), "--out", str(tmp_path / "qa.jsonl"), "--table", str(folder)]):
        assert cli(command) == 2
        one_line_error(capsys, "is a folder")
    assert list(folder.iterdir()) == []


def test_a_read_only_target_is_one_line(tmp_path, monkeypatch):
    """os.replace is where a read-only folder refuses (as root, chmod does not stop a write: simulate it)."""
    target = tmp_path / "x.jsonl"
    target.write_text("old\n")

    def read_only(*_):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "replace", read_only)
    with pytest.raises(FinechatError, match=r"cannot write .*x.jsonl: Read-only file system"):
        with atomic_file(target) as fh:
            fh.write("new\n")
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["x.jsonl"]


def test_atomic_file_keeps_permissions(tmp_path):
    new, old = tmp_path / "new.txt", tmp_path / "old.txt"
    old.write_text("x")
    old.chmod(0o640)
    for path in (new, old):
        with atomic_file(path) as fh:
            fh.write("y")
    assert new.stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert old.stat().st_mode & 0o777 == 0o640


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_stats_png_is_not_silently_overwritten(tiny_model_dir, tmp_path, capsys):
    png = tmp_path / "h.png"
    png.write_bytes(b"my own picture")
    base = ["data", "stats", str(SAMPLES / "alpaca.json"), "--model", str(tiny_model_dir)]
    assert cli(base + ["--png", str(png)]) == 2
    one_line_error(capsys, "exists", "--force")
    assert png.read_bytes() == b"my own picture"
    assert cli(base + ["--png", str(tmp_path / "x.jsonl")]) == 2
    one_line_error(capsys, "x.jsonl", ".png")
    assert not (tmp_path / "x.jsonl").exists()
    assert cli(base + ["--png", str(png), "--force"]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_export_never_replaces_its_base_or_adapter(tiny_model_dir, tmp_path, capsys):
    link = tmp_path / "base-link"
    link.symlink_to(tiny_model_dir)
    before = sorted(p.name for p in Path(tiny_model_dir).iterdir())
    for out in (tiny_model_dir, link, Path(tiny_model_dir).parent):
        assert cli(["export", "--model", str(tiny_model_dir), "--out", str(out), "--force"]) == 2
        one_line_error(capsys, "is the input")
    assert sorted(p.name for p in Path(tiny_model_dir).iterdir()) == before
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    assert cli(["export", "--model", str(tiny_model_dir), "--out", str(a_file), "--force"]) == 2
    one_line_error(capsys, "is a file")
    assert a_file.read_text() == "keep me"


def test_check_output_helpers(tmp_path):
    src = tmp_path / "a"
    src.write_text("a")
    assert check_output_path(tmp_path / "b", src) == tmp_path / "b"
    with pytest.raises(FinechatError, match="exists"):
        check_output_path(src, force=False)
    (tmp_path / "m").mkdir()
    assert check_output_folder(tmp_path / "out", tmp_path / "m") == tmp_path / "out"
    with pytest.raises(FinechatError, match="holds it"):
        check_output_folder(tmp_path, tmp_path / "m")


def test_staged_folder_keeps_the_old_folder_when_a_writer_fails(tmp_path):
    """safetensors' Rust writer wraps a full disk in its own error type; it is one line too, other errors pass."""
    from finechat.files import staged_folder

    final = tmp_path / "export"
    final.mkdir()
    (final / "model.safetensors").write_text("old weights")

    class SafetensorError(Exception):
        pass

    with pytest.raises(FinechatError, match=r"cannot write .*export: No space left on device \(os error 28\)"):
        with staged_folder(final) as tmp:
            (tmp / "model.safetensors").write_text("half")
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    with pytest.raises(KeyError):
        with staged_folder(final):
            raise KeyError("a bug, not a disk")
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    assert (final / "model.safetensors").read_text() == "old weights"


def test_stats_png_goes_under_output_and_replaces_only_its_own(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["data", "stats", str(SAMPLES / "alpaca.json"), "--model", str(tiny_model_dir)]
    assert cli(base) == 0
    png = tmp_path / "output" / "data-stats" / "alpaca_lengths.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and not list(tmp_path.glob("*.png"))  # not in the current folder
    assert cli(base) == 0  # its own histogram is replaced without --force
    capsys.readouterr()
    png.write_bytes(b"\x89PNG someone else's picture")
    assert cli(base) == 2 and "--force" in capsys.readouterr().err

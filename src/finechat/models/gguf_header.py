"""Read a GGUF file's header in bounded memory, checking every size it claims against the file before use.

Why our own walker and not ``gguf.GGUFReader``: the reader trusts the header's counts. It builds a numpy view
and a Python list entry per array item and per string, so a 170-byte file claiming an array of 2**40 items, or a
24 MB file of 3 million empty strings, grows to gigabytes before anything fails. llama.cpp and transformers'
GGUF loader (which uses that reader) come after this check, so a file reaches them only once its header is
known to fit the file and a sane item budget. The walker reads through ``mmap`` (the operating system pages the
file in and out; nothing is copied), keeps only scalar metadata values and short strings, and skips the
contents of arrays and long strings by offset arithmetic.

Format (llama.cpp's ``docs/gguf.md``): magic ``GGUF``, version (uint32; 2 and 3 use 64-bit counts), tensor count
and metadata count (uint64), the metadata key/value pairs, the tensor table (name, dims, type, offset), padding
to ``general.alignment`` (default 32), then tensor data. Big-endian files are recognised by their byte-swapped
version, as llama.cpp does.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

from finechat.errors import FinechatError

# Array items over the whole header. The biggest real vocabularies (Gemma 3: 262,144 tokens, with scores and
# types; Llama 3: 128,256 tokens + 280,147 merges) stay under 800,000; gguf's reader costs ~1 KB a item, so this
# budget also bounds what transformers' loader will allocate after us.
MAX_ARRAY_ITEMS = 1 << 20
MAX_TENSORS = 1 << 20
MAX_FIELDS = 1 << 16  # real files carry a few dozen metadata keys
MAX_KEY_BYTES = 1 << 16
MAX_DIMS = 4  # GGML_MAX_DIMS
_KEEP_STRING_BYTES = 1 << 16  # metadata strings longer than this are skipped (chat templates are read elsewhere)

# GGUF value type -> struct code; 8 is a string (uint64 length + bytes), 9 an array (type, uint64 count, items).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Walker:
    """A cursor over the mapped file that refuses to read past its end."""

    def __init__(self, path: Path, data: Any, endian: str) -> None:
        self.path, self.data, self.endian, self.pos, self.size = path, data, endian, 0, len(data)

    def fail(self, what: str) -> FinechatError:
        return FinechatError(f"{self.path}: truncated or damaged GGUF file ({what} at byte {self.pos}; the file "
                             f"has {self.size} bytes)")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} needs {n} bytes")

    def scalar(self, code: str, what: str) -> Any:
        n = struct.calcsize(code)
        self.need(n, what)
        value = struct.unpack_from(self.endian + code, self.data, self.pos)[0]
        self.pos += n
        return value

    def string(self, what: str, limit: int | None = None) -> str | None:
        """Read a GGUF string; None (skipped, not decoded) when it is longer than ``limit``."""
        n = self.scalar("Q", f"{what} length")
        self.need(n, f"{what} of {n} bytes")
        start, self.pos = self.pos, self.pos + n
        if limit is not None and n > limit:
            return None
        return bytes(self.data[start:self.pos]).decode("utf-8", errors="replace")

    def value(self, kind: int, key: str, budget: list[int]) -> Any:
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind], f"value of {key}")
        if kind == _STRING:
            return self.string(f"value of {key}", _KEEP_STRING_BYTES)
        if kind != _ARRAY:
            raise self.fail(f"unknown value type {kind} for {key}")
        item = self.scalar("I", f"array type of {key}")
        count = self.scalar("Q", f"array length of {key}")
        if item not in _SCALARS and item != _STRING:
            raise self.fail(f"array {key} of type {item} (nested arrays are not GGUF)")
        item_bytes = struct.calcsize(_SCALARS[item]) if item in _SCALARS else 8  # a string: at least its length
        self.need(count * item_bytes, f"array {key} of {count:,} items")
        budget[0] -= count
        if budget[0] < 0:
            raise FinechatError(f"{self.path}: GGUF header claims more than {MAX_ARRAY_ITEMS:,} array items "
                                f"({key} alone has {count:,}); refused before reading them")
        if item in _SCALARS:
            self.pos += count * item_bytes
            return None
        for _ in range(count):
            n = self.scalar("Q", f"a string of {key}")
            self.need(n, f"a string of {key} of {n} bytes")
            self.pos += n
        return None


def read_gguf_header(path: str | Path) -> dict:
    """Walk a GGUF header and tensor table; return its scalar metadata and ``tensor_bytes`` (end of tensor data).

    Every count and length is checked against what is left of the file before it is used, and array items are
    held to ``MAX_ARRAY_ITEMS``; a file that breaks either is one ``FinechatError`` line, in bounded memory.
    """
    import gguf  # for GGML_QUANT_SIZES, the block sizes of each tensor type

    path = Path(path)
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise FinechatError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
        size = path.stat().st_size
        if size < 24:
            raise FinechatError(f"{path}: truncated or damaged GGUF file ({size} bytes, shorter than a GGUF header)")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            version = struct.unpack_from("<I", data, 4)[0]
            endian = "<" if version & 0xFFFF else ">"
            walker = _Walker(path, data, endian)
            walker.pos = 4
            version = walker.scalar("I", "version")
            if version not in (2, 3):
                raise FinechatError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
            n_tensors = walker.scalar("Q", "tensor count")
            n_fields = walker.scalar("Q", "metadata count")
            remaining = size - walker.pos
            if n_fields > MAX_FIELDS or n_fields * 12 > remaining:  # a key/value pair is at least an 8-byte key length and a 4-byte type
                raise walker.fail(f"{n_fields:,} metadata entries claimed")
            if n_tensors > MAX_TENSORS or n_tensors * 24 > remaining:
                raise walker.fail(f"{n_tensors:,} tensors claimed")
            budget = [MAX_ARRAY_ITEMS]
            fields: dict[str, Any] = {}
            for _ in range(n_fields):
                key = walker.string("metadata key", MAX_KEY_BYTES)
                if key is None:
                    raise walker.fail(f"a metadata key longer than {MAX_KEY_BYTES} bytes")
                kind = walker.scalar("I", f"type of {key}")
                fields[key] = walker.value(kind, key, budget)
            end = 0
            for _ in range(n_tensors):
                name = walker.string("tensor name", MAX_KEY_BYTES)
                n_dims = walker.scalar("I", f"dimensions of {name}")
                if name is None or n_dims > MAX_DIMS:
                    raise walker.fail(f"tensor {name!r} with {n_dims} dimensions")
                elements = 1
                for _ in range(n_dims):
                    elements *= walker.scalar("Q", f"a dimension of {name}")
                kind = walker.scalar("I", f"type of {name}")
                offset = walker.scalar("Q", f"offset of {name}")
                try:
                    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
                except (ValueError, KeyError):
                    raise walker.fail(f"tensor {name} of unknown type {kind}") from None
                end = max(end, offset + elements // block * type_size)
            alignment = fields.get("general.alignment") or 32
            if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
                raise walker.fail(f"general.alignment {alignment!r} is not a power of two")
            data_start = -(-walker.pos // alignment) * alignment
    fields["tensor_count"] = n_tensors
    fields["tensor_bytes"] = data_start + end
    if data_start + end > size:
        raise FinechatError(f"{path}: truncated or damaged GGUF file ({size} bytes, its tensors need {data_start + end})")
    return fields

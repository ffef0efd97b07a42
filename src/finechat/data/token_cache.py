"""Tokenized training rows: built from a stream of conversations, cached on disk, memory-mapped, read lazily.

One cache entry is a folder named by its key: ``input_ids.i32`` and ``labels.i32`` hold every row's tokens end
to end (int32), ``offsets.i64`` where each row starts, ``stats.json`` what tokenization did. numpy
memory-maps the three arrays (:class:`TokenRows`); a row becomes Python lists only when the Trainer's data
loader asks for it, so memory stays flat in the number of rows and a second run starts at once. The entry is
built in a ``finechat.files.staged_folder`` and renamed into place, so a reader never sees half of one.

The cache is ours rather than ``datasets.map``'s because its key must be the data *content* plus tokenizer,
template and settings (``datasets`` fingerprints the function and file paths, and re-reads on a moved file);
no pickles are stored.

Several data sources are read one after another, or interleaved by ``mix`` ratios
(:mod:`finechat.data.mixing`); ``stats.sources`` says how many rows each gave.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from finechat.config import finechat_home
from finechat.data.conversation import Conversation
from finechat.data.formats import ReadResult, expand_paths, iter_conversations
from finechat.data.heap import quiet_collector
from finechat.data.mixing import MixSettings, SourceCounter, interleave
from finechat.data.sources import is_datasets_folder, is_hub_name, source_files
from finechat.data.tokenize import (
    IGNORE_INDEX,
    RowBlock,
    TokenizeSettings,
    TokenizeStats,
    pack_examples,
    tokenize_chunks,
)
from finechat.errors import DataError, DataFileError
from finechat.files import staged_folder, write_json_atomic

CACHE_VERSION = 3  # 3: memory-mapped folders; 2: tool-use conversations rendered by data.tool_prompt
ARRAYS = {"input_ids": ("input_ids.i32", "int32"), "labels": ("labels.i32", "int32")}
OFFSETS = "offsets.i64"
STATS = "stats.json"


class _Rows(Sequence):
    """Rows served lazily; equal to any sequence of the same rows."""

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or len(self) != len(other):
            return False
        return all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]


class TokenRows(_Rows):
    """Training rows ``{"input_ids", "labels"}`` served from memory-mapped arrays (a cache folder).

    Supports ``len``, indexing, slicing and :meth:`select` (both give views, nothing is copied), and compares
    equal to any sequence of the same rows.
    """

    def __init__(self, folder: str | Path, index: Any = None):
        import numpy as np

        self.folder = Path(folder)
        self._offsets = np.fromfile(self.folder / OFFSETS, dtype=np.int64) if index is None else index[1]
        self._arrays = {name: _memmap(self.folder / file, dtype) for name, (file, dtype) in ARRAYS.items()} \
            if index is None else index[2]
        self._rows = np.arange(len(self._offsets) - 1) if index is None else index[0]

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return self._view(self._rows[i])
        row = int(self._rows[i])
        a, b = int(self._offsets[row]), int(self._offsets[row + 1])
        return {name: array[a:b].tolist() for name, array in self._arrays.items()}

    def select(self, positions: Any) -> TokenRows:
        """The rows at these positions, as a view (nothing is copied)."""
        import numpy as np

        return self._view(self._rows[np.asarray(positions, dtype=np.int64)])

    def _view(self, rows: Any) -> TokenRows:
        return TokenRows(self.folder, (rows, self._offsets, self._arrays))

    def lengths(self) -> Any:
        """Tokens in each row (a numpy array; nothing is read from the token arrays)."""
        return (self._offsets[1:] - self._offsets[:-1])[self._rows]

    def __repr__(self) -> str:
        return f"TokenRows({len(self)} rows in {self.folder})"


class PackedRows(_Rows):
    """The rows of :func:`finechat.data.tokenize.pack_examples` over memory-mapped :class:`TokenRows`, built
    when the Trainer asks for one: only where each packed row starts (8 bytes per packed row) is held.

    Packs the rows in their order (a view's order too) into rows of at most ``max_length`` tokens, exactly as
    ``pack_examples`` does: ``position_ids`` restart at 0 for each example, ``seq_lengths`` lists them, and each
    example's first label is -100.
    """

    def __init__(self, rows: TokenRows, max_length: int):
        import numpy as np

        self.rows, self.max_length = rows, max_length
        self._starts = array("q", [0])  # row index where each packed row starts, then the end
        used = 0
        lengths = rows.lengths()
        for base in range(0, len(lengths), 1 << 20):  # a million rows' lengths as Python ints at a time
            for j, n in enumerate(lengths[base:base + (1 << 20)].tolist(), start=base):
                if n > max_length:  # build_dataset keeps rows within cutoff_len; never cut silently here
                    raise DataError(f"an example of {n} tokens does not fit a packed row of {max_length}; "
                                    "tokenize with cutoff_len <= the packing length")
                if used and used + n > max_length:
                    self._starts.append(j)
                    used = 0
                used += n
        if len(lengths):
            self._starts.append(len(lengths))
        self._np = np

    def __len__(self) -> int:
        return len(self._starts) - 1

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]
        np = self._np
        examples = [self.rows[k] for k in range(self._starts[i], self._starts[i + 1])]
        seq = [len(e["input_ids"]) for e in examples]
        labels = np.concatenate([np.asarray(e["labels"], dtype=np.int64) for e in examples])
        labels[np.cumsum([0, *seq[:-1]])] = IGNORE_INDEX  # no example learns the next one's first token
        return {"input_ids": [t for e in examples for t in e["input_ids"]], "labels": labels.tolist(),
                "position_ids": [p for n in seq for p in range(n)], "seq_lengths": seq}

    def __repr__(self) -> str:
        return f"PackedRows({len(self)} rows of at most {self.max_length} tokens from {self.rows!r})"


def pack_rows(rows: Sequence[dict], max_length: int) -> Sequence[dict]:
    """Packed rows: lazily over memory-mapped cached rows (:class:`PackedRows`), else ``pack_examples``."""
    return PackedRows(rows, max_length) if isinstance(rows, TokenRows) else pack_examples(rows, max_length)


def longest_packed(rows: Any) -> int | None:
    """Tokens in the longest packed row, from row lengths alone; None when ``rows`` is not PackedRows."""
    if not isinstance(rows, PackedRows) or not len(rows):
        return None
    import numpy as np

    ends = np.cumsum(np.concatenate([[0], rows.rows.lengths()]))
    starts = np.frombuffer(rows._starts, dtype=np.int64)
    return int((ends[starts[1:]] - ends[starts[:-1]]).max())


def _memmap(path: Path, dtype: str) -> Any:
    import numpy as np

    if path.stat().st_size == 0:  # numpy cannot map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def longest_row(rows: Sequence[dict]) -> int:
    """Tokens in the longest row (from the offsets alone for cached rows, packed or not)."""
    packed = longest_packed(rows)
    if packed is not None:
        return packed
    if isinstance(rows, TokenRows):
        return int(rows.lengths().max()) if len(rows) else 0
    return max((len(r["input_ids"]) for r in rows), default=0)


class _CacheWriter:
    """Appends tokenized chunks to the arrays of a cache entry being built in a staged folder."""

    def __init__(self, folder: Path):
        self.files = {name: _append(folder / file) for name, (file, _) in ARRAYS.items()}
        self.offsets = _append(folder / OFFSETS)
        self.end = 0
        self._write_offsets([0])

    def _write_offsets(self, values: list[int]) -> None:
        import numpy as np

        self.offsets.write(np.asarray(values, dtype=np.int64).tobytes())

    def add(self, examples: Sequence[dict]) -> None:
        if not isinstance(examples, RowBlock):
            examples = RowBlock(examples)
        self.files["input_ids"].write(examples.input_ids.tobytes())
        self.files["labels"].write(examples.labels.tobytes())
        self._write_offsets([self.end + e for e in examples.ends])
        self.end += examples.ends[-1] if examples.ends else 0

    def close(self) -> None:
        for fh in [*self.files.values(), self.offsets]:
            fh.close()


def _append(path: Path) -> Any:
    return open(path, "ab")  # inside a staged_folder, which finechat.files publishes atomically when complete


def _name_sources_as_given(stats: TokenizeStats, names: list[str]) -> None:
    """A cache entry is found by its content, so it may have been written from the same files at other paths
    (a copied folder, an earlier run's temporary copy): report the sources, and the bad records in them, by the
    paths this run was given, not the ones stored with the entry."""
    stored = [entry.get("source") for entry in stats.sources]
    if len(stored) != len(names):
        return
    renamed = {old: new for old, new in zip(stored, names) if old is not None and old != new}
    if not renamed:
        return
    stats.sources = [{**entry, "source": names[i]} for i, entry in enumerate(stats.sources)]

    def rename(path: str) -> str:
        if path in renamed:
            return renamed[path]
        for old, new in renamed.items():  # a file inside a folder given as one source
            if path.startswith(old.rstrip("/") + "/"):
                return new.rstrip("/") + path[len(old.rstrip("/")):]
        return path

    stats.bad_records = [[rename(str(rec[0])), *rec[1:]] for rec in stats.bad_records]


def load_cache(folder: Path) -> tuple[TokenRows, TokenizeStats] | None:
    """The rows and stats of a cache entry, or None when it is missing or damaged (it is then rebuilt)."""
    try:
        stats = TokenizeStats(**json.loads((folder / STATS).read_text(encoding="utf-8")))
        rows = TokenRows(folder)
        if len(rows) != stats.examples:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    stats.from_cache, stats.cache_file = True, str(folder)
    return rows, stats


# ------------------------------------------------------------------------------------------------------------
# Cache keys
# ------------------------------------------------------------------------------------------------------------

def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything that changes token ids: vocabulary, merges, normalizer, special tokens."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    h.update(type(tokenizer).__name__.encode())
    h.update(json.dumps({k: str(v) for k, v in (tokenizer.special_tokens_map or {}).items()},
                        sort_keys=True).encode())
    h.update(str(getattr(tokenizer, "chat_template", "") or "").encode())
    return h.hexdigest()


def template_fingerprint(template: Any) -> str:
    if hasattr(template, "tokenizer"):
        return "tokenizer:" + hashlib.sha256(str(template.tokenizer.chat_template).encode()).hexdigest()
    if dataclasses.is_dataclass(template):
        return json.dumps(dataclasses.asdict(template), sort_keys=True, ensure_ascii=False, default=str)
    return repr(template)


def _data_fingerprint(sources: Sequence[Any], read_options: dict) -> str:
    h = hashlib.sha256(json.dumps(read_options, sort_keys=True, default=str).encode())
    for s in sources:
        if isinstance(s, (str, Path)):
            h.update(str(len(source_files(str(s)))).encode())
            for name in source_files(str(s)):
                with open(name, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
        elif isinstance(s, Conversation):
            h.update(json.dumps(s.to_dict(), sort_keys=True, ensure_ascii=False).encode())
        else:
            h.update(json.dumps(s, sort_keys=True, ensure_ascii=False, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def cache_key(sources: Sequence[Any], tokenizer: Any, template: Any, settings: TokenizeSettings,
              read_options: dict | None = None) -> str:
    parts = [str(CACHE_VERSION), _data_fingerprint(sources, read_options or {}), tokenizer_fingerprint(tokenizer),
             template_fingerprint(template), json.dumps(dataclasses.asdict(settings), sort_keys=True)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def default_cache_dir() -> Path:
    return finechat_home() / "tokenized"


# ------------------------------------------------------------------------------------------------------------
# Building
# ------------------------------------------------------------------------------------------------------------

def _check_sources(sources: list) -> list:
    """Paths checked to exist; each entry of ``sources`` stays one source (a folder, a hub name or a file)."""
    for s in sources:
        if isinstance(s, (str, Path)) and not (is_hub_name(s) or is_datasets_folder(s) or Path(s).is_dir()
                                               or Path(s).is_file()):
            raise DataFileError(f"{s}: no such data file")
    return sources


def conversation_stream(sources: list, result: ReadResult, counter: SourceCounter, mix: MixSettings | None = None,
                        format: str = "auto", on_bad_record: str = "error", **read_options: Any
                        ) -> Iterator[Any]:
    """Conversations of every source in order (or interleaved by ``mix``), read lazily; rows per source are
    counted in ``counter``."""
    def stream(source: Any) -> Iterator[Any]:
        if isinstance(source, (str, Path)):
            return iter_conversations(source, result, format, on_bad_record, **read_options)
        return iter([source])

    if mix is None:
        for i, s in enumerate(sources):
            for conv in stream(s):
                counter.count(i)
                yield conv
        return
    yield from interleave([lambda s=s: stream(s) for s in sources], mix, counter)


def build_dataset(paths_or_convs: Any, tokenizer: Any, template: Any, settings: TokenizeSettings | None = None,
                  cache_dir: str | Path | None = None, num_proc: int | None = None, format: str = "auto",
                  on_bad_record: str = "error", use_cache: bool = True, progress: bool = True,
                  mix: MixSettings | None = None, **read_options: Any) -> tuple[Sequence[dict], TokenizeStats]:
    """Tokenize files or Conversations into training examples, served from the disk cache when possible.

    ``paths_or_convs``: a path (file, folder, ``datasets`` folder, ``hub:ORG/NAME``), a list of them, or a list
    of Conversations / message lists. Returns ``(rows, stats)``; rows are ``{"input_ids", "labels"}`` (plus
    ``position_ids`` when packed): memory-mapped :class:`TokenRows` from the cache, or a list with
    ``use_cache=False``. ``cache_dir=None`` uses ``$FINECHAT_HOME/tokenized``.
    """
    settings = settings or TokenizeSettings()
    if isinstance(paths_or_convs, (str, Path, Conversation)):
        paths_or_convs = [paths_or_convs]
    sources = list(paths_or_convs)
    if mix is None and any(isinstance(s, (str, Path)) for s in sources):
        # one list of files, as before: folders expand to their files (convs given directly come first)
        files = expand_paths([s for s in sources if isinstance(s, (str, Path))])
        sources = [s for s in sources if not isinstance(s, (str, Path))] + files
    _check_sources(sources)
    if mix is not None:
        mix.check(len(sources))
    read_opts = {"format": format, "on_bad_record": on_bad_record, **read_options,
                 **({"mix": dataclasses.asdict(mix)} if mix is not None else {})}
    names = [str(s) if isinstance(s, (str, Path)) else "(given)" for s in sources]  # as the run reports them
    cache_path = None
    if use_cache:
        cache_path = Path(cache_dir or default_cache_dir()) / cache_key(sources, tokenizer, template, settings,
                                                                         read_opts)
        loaded = load_cache(cache_path) if cache_path.is_dir() else None
        if loaded is not None:
            rows, stats = loaded
            _name_sources_as_given(stats, names)
            return (pack_rows(rows, settings.cutoff_len) if settings.packing else rows), stats
    result = ReadResult([])
    counter = SourceCounter(names)
    convs = conversation_stream(sources, result, counter, mix, format, on_bad_record, **read_options)
    total = None if any(isinstance(s, (str, Path)) for s in sources) else len(sources)
    examples: list[dict] = []
    stats = TokenizeStats()

    def tokenize_into(sink: Any) -> None:
        with quiet_collector():  # (~40% of the time went to the garbage collector: see finechat.data.heap)
            for ex, st in tokenize_chunks(convs, tokenizer, template, settings, num_proc, progress, total=total):
                stats.add(st)
                sink(ex)

    def finish_stats() -> None:
        if result.skipped and progress:
            print(result.skipped_table(), file=sys.stderr)
        skipped = list(dict.fromkeys(result.skipped))  # a mixed source read again lists a bad record once
        stats.skipped_records, stats.bad_records = len(skipped), [list(x) for x in skipped]
        stats.sources = counter.table()

    rows: Sequence[dict] = examples
    if cache_path is None:
        tokenize_into(examples.extend)
        finish_stats()
    else:
        with staged_folder(cache_path) as staged:  # a reader never sees half an entry
            writer = _CacheWriter(staged)
            try:
                tokenize_into(writer.add)
            finally:
                writer.close()
            finish_stats()
            meta = dataclasses.asdict(stats)
            meta.pop("from_cache"), meta.pop("cache_file")
            write_json_atomic(staged / STATS, meta)
        rows = TokenRows(cache_path)
        stats.cache_file = str(cache_path)
    return (pack_rows(rows, settings.cutoff_len) if settings.packing else rows), stats


def stream_examples(paths: list, tokenizer: Any, template: Any, settings: TokenizeSettings,
                    mix: MixSettings | None = None, counter: SourceCounter | None = None, format: str = "auto",
                    on_bad_record: str = "error", **read_options: Any) -> Iterator[dict]:
    """Training rows tokenized as the data is read, with no cache and no full pass first (``streaming: true``).

    Each call starts the stream again from the beginning (a new epoch); rows per source go to ``counter``.
    """
    sources = _check_sources(list(paths) if mix is not None else expand_paths(paths))
    counter = counter or SourceCounter([str(s) for s in sources])
    result = ReadResult([])
    convs = conversation_stream(sources, result, counter, mix, format, on_bad_record, **read_options)
    for examples, _ in tokenize_chunks(convs, tokenizer, template, settings, num_proc=1, progress=False):
        yield from examples
    if result.skipped:
        print(result.skipped_table(), file=sys.stderr)

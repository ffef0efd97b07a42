"""Data sources beyond plain JSON files: Parquet, Arrow, ``datasets`` folders, hub names, compressed JSONL.

Every source yields plain record dicts numbered from 1 (the row, as a line numbers a JSONL record), so
that the one record loop (:class:`finechat.data.records.RecordReader`) detects the format, makes the same
``Conversation`` and reports a bad record as ``file:row: field: reason`` whatever the file type.

Tables are read through pyarrow and ``datasets`` (never our own parser), one record batch at a time:
Parquet row groups, Arrow IPC files (memory-mapped), folders written by ``Dataset.save_to_disk`` and data
sets in the local ``datasets`` cache named ``hub:ORG/NAME[:SUBSET][@SPLIT]``. Memory stays flat in the
record count. ``.gz`` and ``.zst`` files are opened as streams and read line by line like JSONL.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from finechat.errors import ConfigError, DataFileError

TABLE_SUFFIXES = (".parquet", ".arrow")
COMPRESSED_SUFFIXES = (".gz", ".zst")
HUB_PREFIX = "hub:"
BATCH_ROWS = 1024  # rows per record batch handed to Python: ~1 MB of chat text, flat in the file size


def is_hub_name(source: str | Path) -> bool:
    return isinstance(source, str) and source.startswith(HUB_PREFIX)


def parse_hub_name(source: str) -> tuple[str, str | None, str]:
    """``hub:ORG/NAME[:SUBSET][@SPLIT]`` -> (ORG/NAME, SUBSET or None, SPLIT, default train)."""
    spec = source[len(HUB_PREFIX):]
    spec, _, split = spec.partition("@")
    name, _, subset = spec.partition(":")
    if not name.strip() or name.count("/") > 1 or name.startswith("/") or name.endswith("/"):
        raise ConfigError(f"{source}: expected hub:ORG/NAME, with an optional :SUBSET and @SPLIT "
                          "(e.g. hub:tatsu-lab/alpaca@train)")
    return name, subset or None, split or "train"


def is_datasets_folder(path: str | Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` (or ``DatasetDict.save_to_disk``)."""
    p = Path(path)
    return p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file())


def is_table_source(source: str | Path) -> bool:
    """Read through pyarrow / ``datasets`` (not the JSON reader)."""
    return (is_hub_name(source) or Path(source).suffix.lower() in TABLE_SUFFIXES
            or is_datasets_folder(source))


def data_suffix(path: str | Path) -> str:
    """The data suffix of a file name, under its compression suffix (``a.jsonl.gz`` -> ``.jsonl``)."""
    p = Path(path)
    if p.suffix.lower() in COMPRESSED_SUFFIXES:
        p = p.with_suffix("")
    return p.suffix.lower()


def open_binary(path: str) -> IO[bytes]:
    """The file's bytes, decompressed on the fly for ``.gz`` and ``.zst`` (never all in memory)."""
    suffix = Path(path).suffix.lower()
    try:
        if suffix == ".gz":
            import gzip

            return gzip.open(path, "rb")
        if suffix == ".zst":
            return io.BufferedReader(_ZstdReader(path), buffer_size=1 << 16)
        return open(path, "rb")
    except OSError as e:
        raise DataFileError(f"{path}: cannot read: {e.strerror or e}") from None


class _ZstdReader(io.RawIOBase):
    """A ``.zst`` file's bytes, frame after frame; a file that ends inside a frame raises EOFError, as gzip does
    (zstandard's own ``stream_reader`` just stops there, which would drop the rest silently)."""

    def __init__(self, path: str):
        try:
            import zstandard
        except ImportError:
            raise ConfigError(f"{path}: reading .zst files needs the zstandard package "
                              "(pip install 'finechat[data]')") from None
        self._new = zstandard.ZstdDecompressor().decompressobj
        self._file = open(path, "rb")
        self._frame = self._new()
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            chunk = self._file.read(1 << 16)
            if not chunk:
                if not self._frame.eof:
                    raise EOFError("the zstd stream ends inside a frame")
                return 0
            if self._frame.eof:
                self._frame = self._new()
            out = self._frame.decompress(chunk)
            while self._frame.eof and self._frame.unused_data:  # a file of several frames
                rest = self._frame.unused_data
                self._frame = self._new()
                out += self._frame.decompress(rest)
            self._pending = out
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


def compression_error(path: str, line: int, error: Exception) -> DataFileError:
    """One line for a compressed file that ends early or is damaged (the records before it were read)."""
    kind = "gzip" if path.lower().endswith(".gz") else "zstd"
    reason = "truncated (the file ends before its end marker)" if isinstance(error, EOFError) else \
        (str(error) or type(error).__name__)
    return DataFileError(f"{path}:{line}: ({kind}): damaged compressed file: {reason}; re-download or re-compress it")


def _drop_nulls(value: Any) -> Any:
    """Arrow gives every row every column of the table (absent ones as null); a JSON record just lacks them."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def table_records(source: str) -> Iterator[tuple[int, Any, None]]:
    """``(row, record, None)`` of a Parquet / Arrow file, a ``datasets`` folder or a hub name, batch by batch."""
    row = 0
    for batch in _batches(source):
        for rec in batch.to_pylist():
            row += 1
            yield row, _drop_nulls(rec), None


def _batches(source: str) -> Iterator[Any]:
    if is_hub_name(source) or is_datasets_folder(source):
        dataset = load_table_dataset(source)
        yield from dataset.data.to_batches(max_chunksize=BATCH_ROWS)
        return
    import pyarrow as pa

    suffix = Path(source).suffix.lower()
    if not Path(source).is_file():
        raise DataFileError(f"{source}: no such data file")
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            yield from pq.ParquetFile(source).iter_batches(batch_size=BATCH_ROWS)
            return
        with pa.memory_map(source) as mm:
            try:
                reader = pa.ipc.open_file(mm)
                batches: Any = (reader.get_batch(i) for i in range(reader.num_record_batches))
            except pa.ArrowInvalid:
                mm.seek(0)  # datasets writes Arrow as an IPC stream, not a file
                batches = pa.ipc.open_stream(mm)
            for batch in batches:  # memory-mapped: slices are views, nothing is copied until a row is read
                for start in range(0, batch.num_rows, BATCH_ROWS):
                    yield batch.slice(start, BATCH_ROWS)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
        kind = "Parquet" if suffix == ".parquet" else "Arrow"
        raise DataFileError(f"{source}: ({kind.lower()}): not a readable {kind} file (truncated or damaged?): "
                        f"{str(e).splitlines()[0]}") from None


def row_count(source: str) -> int | None:
    """Rows of a table source from its metadata (no data read), or None when only a full read would tell."""
    try:
        if Path(source).suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(source).metadata.num_rows
        if is_hub_name(source) or is_datasets_folder(source):
            return load_table_dataset(source).num_rows
    except Exception:  # noqa: BLE001 - a count is only a progress hint; the read reports the real error
        return None
    return None


def load_table_dataset(source: str) -> Any:
    """A memory-mapped ``datasets.Dataset`` for a ``save_to_disk`` folder or a hub name (from the local cache)."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"{source}: reading datasets folders and hub names needs the datasets package "
                          "(pip install 'finechat[data]')") from None
    if is_hub_name(source):
        return _hub_dataset(source)
    try:
        dataset = datasets.load_from_disk(source)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise DataFileError(f"{source}: not a readable datasets folder: {str(e).splitlines()[0]}") from None
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise DataFileError(f"{source}: a DatasetDict without a train split (splits: {', '.join(dataset)}); "
                            f"point data: at one of {', '.join(str(Path(source) / s) for s in dataset)}")
        dataset = dataset["train"]
    return dataset


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's endpoint (``HF_ENDPOINT``) takes a TCP connection within ``timeout`` seconds.

    Without this, a machine with no route to the hub spends about 30 s in huggingface_hub's five retries (each
    printed) before the one-line error; a machine that can reach it pays one connection. Behind an HTTP(S)
    proxy (``HTTPS_PROXY`` and the like, which huggingface_hub honours) a direct connection says nothing, so
    the hub then counts as reachable and ``datasets`` decides.
    """
    import socket
    from urllib.parse import urlparse
    from urllib.request import getproxies, proxy_bypass

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    proxies = getproxies()
    if (proxies.get(url.scheme) or proxies.get("all")) and not proxy_bypass(url.hostname or ""):
        return True
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_dataset(source: str) -> Any:
    """A hub data set from the local ``datasets`` cache; downloaded by ``datasets`` only when it is online."""
    import datasets
    from datasets.packaged_modules.cache.cache import Cache

    name, subset, split = parse_hub_name(source)
    try:
        builder = Cache(dataset_name=name.split("/")[-1], repo_id=name, config_name=subset, version="auto",
                        hash="auto")
        return builder.as_dataset(split=split)
    except (ValueError, FileNotFoundError, KeyError) as e:
        cached_error = str(e).splitlines()[0]
    from huggingface_hub import constants

    offline = ""
    if datasets.config.HF_HUB_OFFLINE:
        offline = " and HF_HUB_OFFLINE is set"
    elif not _hub_reachable():
        offline = f" and the hub ({constants.ENDPOINT}) cannot be reached from this machine"
    if not offline:
        try:
            return datasets.load_dataset(name, subset, split=split)
        except Exception as e:  # noqa: BLE001 - any hub failure is one line for the user
            cached_error = f"{cached_error}; download failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    where = datasets.config.HF_DATASETS_CACHE
    subset_arg = f", {subset!r}" if subset else ""
    raise ConfigError(
        f"{source}: data set {name}{f' (subset {subset})' if subset else ''}, split {split}, is not in the local "
        f"datasets cache ({where}){offline} ({cached_error}); "
        f"point data: at a local copy instead: a Parquet/JSONL file or a folder written by "
        f"datasets.load_dataset({name!r}{subset_arg}, split={split!r}).save_to_disk(DIR)")


def source_files(source: str) -> list[str]:
    """The files whose bytes make up a source (what the tokenized cache's key hashes)."""
    if is_hub_name(source):
        return sorted(f["filename"] for f in load_table_dataset(source).cache_files)
    p = Path(source)
    if p.is_dir():
        return sorted(str(f) for f in p.rglob("*") if f.is_file())
    return [str(p)]

"""The ``Search(query)`` tool: BM25 over local documents (``--docs DIR``), or a pluggable search API.

Documents are ``.txt`` / ``.md`` files (split into passages at blank lines, long ones cut into pieces of
about ``PASSAGE_CHARS`` characters) and ``.jsonl`` files (one document a line: ``text`` or ``content``,
optional ``title`` and ``url``). Text is tokenized with jieba, which cuts Chinese into words and leaves
English words whole; scores are Okapi BM25 from ``rank_bm25``. Results come back the way MOSS's search
results look: numbered snippets, each with its source (``file:line`` or the document's url).

A real web search plugs in through :class:`SearchBackend` (any object with ``search(query, k)``
returning :class:`Hit` objects); finechat ships none and its tests never call one.

Only what is inside ``--docs`` is read: a symlink that leads out of the folder is skipped, as are unreadable
files and folders (each counted and named in :attr:`LocalSearch.summary`). Indexing costs about 2 s and 12 MB of
memory per MB of text (measured: 134 MB took 265 s and 1.6 GB), so a folder over ``MAX_TOTAL_BYTES`` is refused
and a file over ``MAX_FILE_BYTES`` is skipped. A query scores the passages in chunks and checks between them
whether the tool runner's time limit has passed (``stop``), so a timed-out query ends instead of running on in
its thread.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import stat
import threading
import unicodedata
from pathlib import Path
from typing import Protocol

from finechat.data.records import json_lines
from finechat.errors import DataError

PASSAGE_CHARS = 600
SNIPPET_CHARS = 300
DOC_SUFFIXES = (".txt", ".md", ".jsonl")
MAX_TOTAL_BYTES = 32 * 2**20  # about a minute of indexing and 400 MB of memory
MAX_FILE_BYTES = 8 * 2**20
SCORE_CHUNK = 20_000  # passages scored between two looks at the stop flag


class SearchStopped(Exception):
    """A query stopped because the tool runner's time limit passed."""


@dataclasses.dataclass
class Hit:
    """One search result."""

    text: str
    source: str
    score: float = 0.0
    title: str = ""


class SearchBackend(Protocol):
    """What a search engine plugged into ``Search`` provides (a web API client, a vector store, ...)."""

    def search(self, query: str, k: int) -> list[Hit]: ...


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens: jieba's search-mode cut for Chinese, words and numbers for the rest."""
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)  # not "Building prefix dict ..." on every start
    tokens = []
    for tok in jieba.lcut_for_search(text.lower()):
        tok = tok.strip()
        if tok and any(unicodedata.category(c)[0] in "LN" for c in tok):
            tokens.append(tok)
    return tokens


def _passages(text: str) -> list[tuple[int, str]]:
    """Split text at blank lines into (first line number, passage), cutting long ones.

    A Markdown heading standing alone is kept with the passage that follows it.
    """
    out: list[tuple[int, str]] = []
    start, buf, heading = 1, [], None
    lines = text.splitlines()
    for number, line in enumerate(lines + [""], start=1):
        if line.strip():
            if not buf:
                start = number
            buf.append(line.strip())
            continue
        if buf:
            passage = " ".join(buf)
            if len(buf) == 1 and passage.startswith("#"):
                heading = heading or (start, "")
                heading = (heading[0], (heading[1] + " " + passage.lstrip("# ")).strip())
                buf = []
                continue
            if heading:
                start, passage = heading[0], f"{heading[1]}: {passage}"
                heading = None
            for i in range(0, len(passage), PASSAGE_CHARS):
                out.append((start, passage[i:i + PASSAGE_CHARS]))
            buf = []
    if heading:
        out.append(heading)
    return out


class LocalSearch:
    """BM25 over the documents in a folder (read once, at start)."""

    def __init__(self, docs: str | Path, max_total_bytes: int = MAX_TOTAL_BYTES,
                 max_file_bytes: int = MAX_FILE_BYTES):
        root = Path(docs)
        if not root.is_dir():
            raise DataError(f"--docs {docs}: not a folder")
        self.root = root
        self.hits: list[Hit] = []
        self.skipped: list[str] = []
        self.files = 0
        files = self._documents(max_file_bytes)
        total = sum(size for _, _, size in files)
        if total > max_total_bytes:
            raise DataError(f"--docs {docs}: {total / 2**20:.1f} MB of .txt/.md/.jsonl text in {len(files)} files, "
                            f"over the {max_total_bytes / 2**20:g} MB limit (indexing takes about 2 s and 12 MB of "
                            "memory per MB); point --docs at a smaller folder")
        for path, rel, _ in files:
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError) as e:
                self.skipped.append(f"{rel} ({e.__class__.__name__})")
                continue
            self.files += 1
            if path.suffix.lower() == ".jsonl":
                self._read_jsonl(rel, text)
            else:
                self.hits.extend(Hit(p, f"{rel}:{line}") for line, p in _passages(text))
        if not self.hits:
            raise DataError(f"--docs {docs}: no .txt, .md or .jsonl text found"
                            + (f" (skipped: {', '.join(self.skipped[:5])})" if self.skipped else ""))
        from rank_bm25 import BM25Okapi

        self.bm25 = BM25Okapi([tokenize(h.title + " " + h.text) or ["\0"] for h in self.hits])

    def _documents(self, max_file_bytes: int) -> list[tuple[Path, str, int]]:
        """(path, relative name, size) of the regular document files inside the folder; the rest is skipped and
        named: other suffixes, links leading out of the folder, unreadable entries, files over the size limit."""
        root_real = self.root.resolve()
        found: list[tuple[Path, str, int]] = []

        def unreadable(error: OSError) -> None:
            where = Path(error.filename or "?")
            rel = where.relative_to(self.root).as_posix() if where.is_relative_to(self.root) else str(where)
            self.skipped.append(f"{rel}/ ({error.strerror or error.__class__.__name__})")

        # os.walk does not follow links to folders (so no loop and no way out); links to files are checked below.
        for folder, dirs, names in os.walk(self.root, onerror=unreadable):
            dirs.sort()
            for name in list(dirs):
                if os.path.islink(os.path.join(folder, name)):
                    self.skipped.append(f"{Path(folder, name).relative_to(self.root).as_posix()}/ (link to a folder, "
                                        "not followed)")
            for name in sorted(names):
                path = Path(folder, name)
                rel = path.relative_to(self.root).as_posix()
                if path.suffix.lower() not in DOC_SUFFIXES:
                    self.skipped.append(f"{rel} (not {'/'.join(DOC_SUFFIXES)})")
                    continue
                try:
                    real = path.resolve(strict=True)
                    info = real.stat()
                except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop
                    self.skipped.append(f"{rel} ({getattr(e, 'strerror', None) or e.__class__.__name__})")
                    continue
                if not real.is_relative_to(root_real):
                    self.skipped.append(f"{rel} (a link to {real}, outside --docs)")
                elif not stat.S_ISREG(info.st_mode):
                    self.skipped.append(f"{rel} (not a regular file)")  # a FIFO or device would block or never end
                elif info.st_size > max_file_bytes:
                    self.skipped.append(f"{rel} ({info.st_size / 2**20:.1f} MB, over the "
                                        f"{max_file_bytes / 2**20:g} MB limit for one file)")
                else:
                    found.append((path, rel, info.st_size))
        return found

    def _read_jsonl(self, rel: str, text: str) -> None:
        def bad_line(number: int, error: str) -> None:
            self.skipped.append(f"{rel}:{number} (bad JSON: {error})")

        for number, row in json_lines(text, rel, on_bad_line=bad_line):
            body = row.get("text") or row.get("content") if isinstance(row, dict) else None
            if not isinstance(body, str) or not body.strip():
                self.skipped.append(f"{rel}:{number} (no 'text' or 'content')")
                continue
            source = row.get("url") or f"{rel}:{number}"
            title = str(row.get("title") or "")
            for i in range(0, len(body), PASSAGE_CHARS):
                self.hits.append(Hit(body[i:i + PASSAGE_CHARS], str(source), title=title))

    @property
    def summary(self) -> str:
        text = f"{len(self.hits)} passages from {self.files} files in {self.root}"
        if self.skipped:
            text += f"; skipped {len(self.skipped)}: {', '.join(self.skipped[:3])}{' ...' if len(self.skipped) > 3 else ''}"
        return text

    def search(self, query: str, k: int = 3, stop: threading.Event | None = None) -> list[Hit]:
        """The ``k`` best passages; raises :class:`SearchStopped` soon after ``stop`` is set."""
        import numpy as np

        words = tokenize(query)
        if not words:
            return []
        scores = np.zeros(len(self.hits))
        for start in range(0, len(self.hits), SCORE_CHUNK):
            if stop is not None and stop.is_set():
                raise SearchStopped(f"the search for {query!r} was stopped at its time limit")
            ids = list(range(start, min(start + SCORE_CHUNK, len(self.hits))))
            scores[start:start + len(ids)] = self.bm25.get_batch_scores(words, ids)
        ranked = [int(i) for i in np.argsort(-scores, kind="stable")[:k]]
        query_words = set(words)
        out = []
        for i in ranked[:k]:
            hit = self.hits[i]
            if scores[i] <= 0 and not query_words & set(tokenize(hit.title + " " + hit.text)):
                continue  # shares no word with the query
            out.append(dataclasses.replace(hit, score=float(scores[i])))
        return out


def _snippet(text: str, query: str) -> str:
    """Up to SNIPPET_CHARS characters around the first query word found in the text."""
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) <= SNIPPET_CHARS:
        return text
    lower = text.lower()
    starts = [lower.find(w) for w in tokenize(query) if lower.find(w) >= 0]
    start = max(0, min(starts) - SNIPPET_CHARS // 4) if starts else 0
    piece = text[start:start + SNIPPET_CHARS]
    return ("..." if start else "") + piece + ("..." if start + SNIPPET_CHARS < len(text) else "")


def format_hits(hits: list[Hit], query: str) -> str:
    """MOSS-style numbered results: ``<|1|>: snippet (source: file.md:3)``."""
    if not hits:
        return f"no results for {query!r}"
    lines = []
    for n, hit in enumerate(hits, start=1):
        title = f"{hit.title}: " if hit.title else ""
        lines.append(f"<|{n}|>: {title}{_snippet(hit.text, query)} (source: {hit.source})")
    return "\n".join(lines)


def make_search(backend: SearchBackend, k: int = 3):
    """The ``Search`` tool function over ``backend``."""

    # A backend that takes ``stop`` (LocalSearch) ends a query the tool runner has given up on.
    stoppable = "stop" in inspect.signature(backend.search).parameters

    def search(query: str, stop: threading.Event | None = None) -> str:
        if not isinstance(query, str) or not query.strip():
            raise ValueError("empty search query")
        extra = {"stop": stop} if stoppable and stop is not None else {}
        return format_hits(backend.search(query.strip(), k, **extra), query.strip())

    search.backend = backend  # so front ends can show what was indexed
    return search

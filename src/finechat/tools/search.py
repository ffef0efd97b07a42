"""The ``Search(query)`` tool: BM25 over local documents (``--docs DIR``), or a pluggable search API.

Documents are ``.txt`` / ``.md`` files (split into passages at blank lines, long ones cut into pieces of
about ``PASSAGE_CHARS`` characters) and ``.jsonl`` files (one document a line: ``text`` or ``content``,
optional ``title`` and ``url``). Text is tokenized with jieba, which cuts Chinese into words and leaves
English words whole; scores are Okapi BM25 from ``rank_bm25``. Results come back the way MOSS's search
results look: numbered snippets, each with its source (``file:line`` or the document's url).

A real web search plugs in through :class:`SearchBackend` (any object with ``search(query, k)``
returning :class:`Hit` objects); finechat ships none and its tests never call one.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from pathlib import Path
from typing import Protocol

from finechat.data.records import json_lines
from finechat.errors import DataError

PASSAGE_CHARS = 600
SNIPPET_CHARS = 300
DOC_SUFFIXES = (".txt", ".md", ".jsonl")


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

    def __init__(self, docs: str | Path):
        root = Path(docs)
        if not root.is_dir():
            raise DataError(f"--docs {docs}: not a folder")
        self.root = root
        self.hits: list[Hit] = []
        self.skipped: list[str] = []
        self.files = 0
        files = sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            rel = path.relative_to(root).as_posix()
            if path.suffix.lower() not in DOC_SUFFIXES:
                self.skipped.append(f"{rel} (not {'/'.join(DOC_SUFFIXES)})")
                continue
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

    def search(self, query: str, k: int = 3) -> list[Hit]:
        words = tokenize(query)
        if not words:
            return []
        scores = self.bm25.get_scores(words)
        ranked = sorted(range(len(self.hits)), key=lambda i: -scores[i])
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

    def search(query: str) -> str:
        if not isinstance(query, str) or not query.strip():
            raise ValueError("empty search query")
        return format_hits(backend.search(query.strip(), k), query.strip())

    search.backend = backend  # so front ends can show what was indexed
    return search

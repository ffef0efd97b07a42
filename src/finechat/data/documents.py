"""Plain-text documents for pretraining objectives (``stage: pretrain``, GLM blank infilling previews)."""

from __future__ import annotations

from pathlib import Path

from finechat.data.records import json_lines
from finechat.errors import DataError


def read_documents(paths: list[str], document_per: str = "line") -> list[str]:
    """Plain-text documents from .txt files (per line or per file) or .json/.jsonl records with ``text``."""
    docs: list[str] = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise DataError(f"{p}: no such data file")
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            raise DataError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        if path.suffix in (".jsonl", ".json"):
            for n, rec in json_lines(text, p):
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise DataError(f"{p}:{n}: text: a pretraining record needs a 'text' string")
                docs.append(rec["text"])
        elif document_per == "file":
            if text.strip():
                docs.append(text)
        else:
            docs += [line for line in text.splitlines() if line.strip()]
    if not docs:
        raise DataError(f"no text in {', '.join(paths)}")
    return docs

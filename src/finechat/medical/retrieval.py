"""Medical demo answers: retrieval over a disease table (ChatDoctor's autonomous mode) and the notice.

ChatDoctor's "autonomous" variant looks the patient's words up in a disease database before answering and
puts the matching entries into the prompt. :class:`DiseaseTable` does that over a CSV table (columns
``disease, english_name, department, site, symptoms, tests, drugs, complications``; only ``disease`` is
required) or a knowledge-graph file (``finechat.medical.kg``): each row becomes one document, scored with
Okapi BM25 (``rank_bm25``) over jieba words, the same tokenizer as the ``Search`` tool in
``finechat.tools.search``.

:class:`MedicalHook` is a hook on the engine (:func:`attach_medical`; the engine calls it on every answer,
so every front end -- terminal, web page, HTTP API, tools -- gets it with no wrapper): the top records go
into the prompt, the answer ends with the records it was given ("Sources: [1] 偏头痛 (diseases.csv row 2)")
and with :data:`NOTICE`, the reminder that this is not medical advice. The history keeps the plain answer,
so the sources and the notice are not fed back to the model.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path

from finechat.data.templates import Message
from finechat.errors import DataError
from finechat.generate.contract import ChatEngine
from finechat.medical.kg import load_graph
from finechat.tools.search import tokenize

NOTICE = "⚠ 以上内容由AI生成，仅供参考，不构成医疗建议；如有不适请及时就医。Not medical advice: please consult a doctor."

# Common English words that would otherwise match rows by accident ("a" in "维A酸").
STOPWORDS = frozenset("a an and are be can do does for have has how i in is it its me my of on or should "
                      "the to what which with you".split())

# Column -> label shown in the prompt. The first column names the disease.
COLUMNS = {
    "disease": "疾病", "english_name": "英文名", "department": "科室", "site": "部位", "symptoms": "症状",
    "tests": "检查", "drugs": "药物", "complications": "并发症",
}


def with_notice(text: str, notice: str = NOTICE) -> str:
    """``text`` with the not-medical-advice notice appended (once)."""
    if not notice or text.rstrip().endswith(notice):
        return text
    return f"{text.rstrip()}\n\n{notice}" if text.strip() else notice


@dataclasses.dataclass
class DiseaseEntry:
    """One row of the disease table and where it came from."""

    name: str
    fields: dict[str, str]
    source: str  # "diseases.csv row 2" / "graph.json#1"

    def describe(self) -> str:
        parts = [f"{COLUMNS.get(k, k)}: {v}" for k, v in self.fields.items() if v and k != "disease"]
        facts = f"（{'；'.join(parts)}）" if parts else ""
        return f"{self.name}{facts} [source: {self.source}]"


class DiseaseTable:
    """BM25 retrieval over a disease table (CSV) or a knowledge graph (JSON / JSONL)."""

    def __init__(self, entries: list[DiseaseEntry], path: str = ""):
        if not entries:
            raise DataError(f"{path or 'disease table'}: no rows")
        from rank_bm25 import BM25Okapi

        self.entries = entries
        self.path = path
        # The disease name counts three times: a question naming it should find that row first.
        docs = [tokenize(" ".join([e.name] * 3 + list(e.fields.values()))) or ["\0"] for e in entries]
        self.bm25 = BM25Okapi(docs)

    @classmethod
    def load(cls, path: str | Path) -> DiseaseTable:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: no such disease table (CSV, or a knowledge graph .json/.jsonl)")
        if path.suffix.lower() == ".csv":
            return cls(_read_csv(path), str(path))
        graph = load_graph(path)
        entries = []
        for r in graph.records:
            values = {"disease": r.name, "english_name": r.english, "department": "、".join(r.departments),
                      "site": "、".join(r.sites), "symptoms": "、".join(r.symptoms), "tests": "、".join(r.tests),
                      "drugs": "、".join(r.drugs + [t for t in r.treatments if t not in r.drugs]),
                      "complications": "、".join(r.complications)}
            entries.append(DiseaseEntry(r.name, values, r.source))
        return cls(entries, str(path))

    def search(self, query: str, k: int = 3) -> list[tuple[float, DiseaseEntry]]:
        """The ``k`` best rows for ``query`` that share at least one word with it, best first."""
        words = [w for w in tokenize(query) if w not in STOPWORDS]
        if not words or k < 1:
            return []
        scores = self.bm25.get_scores(words)
        ranked = sorted(range(len(self.entries)), key=lambda i: (-scores[i], i))
        return [(float(scores[i]), self.entries[i]) for i in ranked[:k] if scores[i] > 0]


def _read_csv(path: Path) -> list[DiseaseEntry]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    reader = csv.DictReader(text.splitlines())
    header = [h.strip() for h in reader.fieldnames or []]
    if "disease" not in header:
        raise DataError(f"{path}:1: the header needs a 'disease' column (has: {', '.join(header) or 'nothing'})")
    entries = []
    for number, row in enumerate(reader, start=2):
        if None in row:
            raise DataError(f"{path}:{number}: more cells than header columns")
        values = {k.strip(): (v or "").strip() for k, v in row.items()}
        if not values.get("disease"):
            raise DataError(f"{path}:{number}: field 'disease' is empty")
        entries.append(DiseaseEntry(values["disease"], values, f"{path.name} row {number}"))
    return entries


def retrieval_prompt(query: str, hits: list[tuple[float, DiseaseEntry]]) -> str:
    """The patient's words with the retrieved records in front, ChatDoctor-autonomous style."""
    if not hits:
        return query
    lines = ["以下是疾病数据库中与问题相关的记录 (entries from the disease database):"]
    lines += [f"[{n}] {entry.describe()}" for n, (_, entry) in enumerate(hits, start=1)]
    lines += ["请参考这些记录回答，并注明引用的编号 (answer using these entries, cite them as [n]).", "",
              f"问题 (question): {query}"]
    return "\n".join(lines)


def sources_line(hits: list[tuple[float, DiseaseEntry]]) -> str:
    """'Sources: [1] 偏头痛 (diseases.csv row 2); ...' for the end of an answer."""
    if not hits:
        return ""
    return "参考来源 (sources): " + "; ".join(f"[{n}] {e.name} ({e.source})" for n, (_, e) in enumerate(hits, 1))


class MedicalHook:
    """The medical demo as a hook on the engine: optional retrieval, cited sources, the notice on every answer.

    The engine calls :meth:`begin` once per answer (``engine.hooks``, see
    :class:`finechat.generate.contract.TurnHook`): the records for the last user message go into the
    prompt, and the shown answer ends with their sources and the notice. Use :func:`attach_medical`.
    """

    def __init__(self, table: DiseaseTable | None = None, k: int = 3, notice: str | None = NOTICE):
        self.table = table
        self.k = k
        self.notice = notice

    def begin(self, messages: list[Message]) -> tuple[list[Message], Callable[[str], str]]:
        """The messages with the records for the last user message put in, and the finish of the answer."""
        messages = [dict(m) for m in messages]
        last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
        hits: list[tuple[float, DiseaseEntry]] = []
        if last_user is not None:
            query = str(messages[last_user].get("content") or "")
            hits = self.table.search(query, self.k) if self.table is not None else []
            messages[last_user]["content"] = retrieval_prompt(query, hits)
        return messages, functools.partial(self.finish, hits=hits)

    def finish(self, text: str, hits: list[tuple[float, DiseaseEntry]]) -> str:
        """``text`` with the sources of ``hits`` and the notice appended."""
        src = sources_line(hits)
        if src:
            text = f"{text.rstrip()}\n\n{src}" if text.strip() else src
        return with_notice(text, self.notice) if self.notice else text


def attach_medical(engine: ChatEngine, table: DiseaseTable | None = None, k: int = 3,
                   notice: str | None = NOTICE) -> ChatEngine:
    """Make ``engine`` the medical demo (retrieval over ``table`` when given, sources, the notice); returns it."""
    engine.hooks.append(MedicalHook(table, k, notice))
    return engine

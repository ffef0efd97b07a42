"""Medical knowledge graph -> instruction QA pairs, the way Huatuo (本草) built its training data from cMeKG.

A graph is a list of cMeKG-style records, one per disease::

    {"中心词": "偏头痛", "英文名": "Migraine", "所属科室": ["神经内科"], "发病部位": ["头部"],
     "相关症状": ["搏动性头痛", "恶心"], "药物治疗": ["布洛芬"], "检查": ["头颅MRI"], "并发症": [...],
     "相关疾病": [...], "治疗方法": [...]}

stored as a JSON array, a JSON object with ``records`` (and optionally ``departments_en``, the English
names of departments), or JSONL. Every field but ``中心词`` is optional; a field may be a list of strings
or one string with items separated by 、 , ， ; or ；.

Each (disease, relation) fact becomes ``phrasings`` question/answer pairs, each with a different
question template (Chinese, plus English for departments): symptoms -> disease, disease -> department,
drugs, site, complications, tests and symptoms. Output rows are Huatuo's ``{instruction, input, output}``
plus ``relation``, ``answers`` (the gold entities an evaluation looks for in a generated answer), ``lang``
and ``source`` (file, record number and the whole record the pair came from). Everything is decided by
one seeded ``random.Random``: the same graph and seed give the same file.

Held-out questions (``holdout``): by default a fraction of the *facts* keep one of their phrasings out of
the training file, so the evaluation asks about a fact the model was taught in words it has not seen
(what Huatuo's evaluation measures: was the knowledge injected?). ``holdout_by="disease"`` instead holds
out every pair of a fraction of the diseases (generalisation to unseen diseases; a small model cannot
know those facts, so expect little).

Template-based generation is ours: no library turns a knowledge graph into QA text.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import random
import re
from pathlib import Path
from typing import Any

from finechat.data.records import json_lines
from finechat.errors import DataError, FinechatError
from finechat.files import atomic_file, check_output_path, same_file, write_jsonl_atomic

# cMeKG field name -> our attribute. Only 中心词 is required.
FIELDS = {
    "中心词": "name",
    "英文名": "english",
    "所属科室": "departments",
    "发病部位": "sites",
    "相关症状": "symptoms",
    "药物治疗": "drugs",
    "检查": "tests",
    "并发症": "complications",
    "相关疾病": "related",
    "治疗方法": "treatments",
}
LIST_FIELDS = [k for k, v in FIELDS.items() if v not in ("name", "english")]
_SPLIT = re.compile(r"[、,，;；]")


@dataclasses.dataclass
class DiseaseRecord:
    """One disease of the graph, with where it came from."""

    name: str
    english: str = ""
    departments: list[str] = dataclasses.field(default_factory=list)
    sites: list[str] = dataclasses.field(default_factory=list)
    symptoms: list[str] = dataclasses.field(default_factory=list)
    drugs: list[str] = dataclasses.field(default_factory=list)
    tests: list[str] = dataclasses.field(default_factory=list)
    complications: list[str] = dataclasses.field(default_factory=list)
    related: list[str] = dataclasses.field(default_factory=list)
    treatments: list[str] = dataclasses.field(default_factory=list)
    source: str = ""  # "graph.json#3" (record number, 1-based) or "graph.jsonl:3" (line)
    raw: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class KnowledgeGraph:
    """The records of a graph file plus the English names of its departments."""

    records: list[DiseaseRecord]
    departments_en: dict[str, str]
    path: str
    license: str = ""


def _items(value: Any, where: str, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in _SPLIT.split(value) if v.strip()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value if v.strip()]
    raise DataError(f"{where}: field {key!r} must be a list of strings or a string, got {type(value).__name__}")


def parse_record(raw: Any, where: str) -> DiseaseRecord:
    """One cMeKG-style record -> DiseaseRecord; errors name the file, record and field."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    name = raw.get("中心词")
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"{where}: missing or empty field '中心词' (the disease name)")
    english = raw.get("英文名") or ""
    if not isinstance(english, str):
        raise DataError(f"{where}: field '英文名' must be a string")
    values = {FIELDS[k]: _items(raw.get(k), where, k) for k in LIST_FIELDS}
    return DiseaseRecord(name=name.strip(), english=english.strip(), source=where, raw=raw, **values)


def load_graph(path: str | Path) -> KnowledgeGraph:
    """Read a graph file (JSON array, JSON object with ``records``, or JSONL)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    departments_en: dict[str, str] = {}
    license_ = ""
    entries: list[tuple[str, Any]] = []
    stripped = text.lstrip()
    if stripped.startswith("[") or stripped.startswith("{") and not _looks_like_jsonl(text):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        if isinstance(doc, dict) and "records" not in doc and "中心词" in doc:
            doc = [doc]  # a JSONL file with a single record reads as one JSON object
        if isinstance(doc, dict):
            if not isinstance(doc.get("records"), list):
                raise DataError(f"{path}: a JSON object graph needs a 'records' list")
            departments_en = doc.get("departments_en") or {}
            if not isinstance(departments_en, dict):
                raise DataError(f"{path}: 'departments_en' must be an object")
            license_ = str(doc.get("license") or "")
            doc = doc["records"]
        entries = [(f"{path.name}#{i}", r) for i, r in enumerate(doc, start=1)]
    else:
        entries = [(f"{path.name}:{number}", value) for number, value in json_lines(text, path)]
    records = [parse_record(raw, where) for where, raw in entries]
    if not records:
        raise DataError(f"{path}: no records")
    seen: dict[str, str] = {}
    for r in records:
        if r.name in seen:
            raise DataError(f"{r.source}: disease {r.name!r} already defined at {seen[r.name]}")
        seen[r.name] = r.source
    return KnowledgeGraph(records, {str(k): str(v) for k, v in departments_en.items()}, str(path), license_)


def _looks_like_jsonl(text: str) -> bool:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) < 2:
        return False
    try:
        json.loads(lines[0])
        return True
    except json.JSONDecodeError:
        return False


# -- question templates ------------------------------------------------------------------------------
# Each relation: (language, question templates, answer templates). Answers stay short so that a small
# model can learn the fact in a few hundred steps; the gold entity comes early in every answer.
QUESTIONS: dict[str, tuple[str, list[str], list[str]]] = {
    "department": ("zh", [
        "{name}应该挂哪个科？",
        "得了{name}去医院看哪个科室？",
        "{name}属于哪个科室的疾病？",
        "请问{name}一般在什么科就诊？",
        "我怀疑自己有{name}，应该去哪个科室？",
        "{name}归哪个科管？",
        "家人确诊了{name}，复诊挂什么科？",
    ], [
        "建议挂{department}。",
        "应到{department}就诊。",
        "{department}。{name}属于{department}的疾病。",
    ]),
    "department_en": ("en", [
        "Which department treats {english}?",
        "What kind of doctor should I see for {english}?",
        "I think I have {english}. Which clinic should I go to?",
        "{english} belongs to which hospital department?",
    ], [
        "{english} is treated in {department_en}.",
        "See a doctor in {department_en}.",
    ]),
    "symptom_disease": ("zh", [
        "最近{symptoms}，可能是什么病？",
        "出现{symptoms}是什么疾病？",
        "我有{symptoms}的症状，可能得了什么病？",
        "{symptoms}，这是怎么回事？",
        "医生，我{symptoms}，是得了什么病吗？",
    ], [
        "可能是{name}，建议到{department}就诊。",
        "这些症状提示{name}，请到{department}进一步检查。",
    ]),
    "drug": ("zh", [
        "{name}常用什么药物治疗？",
        "{name}吃什么药？",
        "治疗{name}的常用药物有哪些？",
        "得了{name}一般用什么药？",
    ], [
        "{name}常用的药物有{drugs}。",
        "常用药物有{drugs}，具体用药请遵医嘱。",
    ]),
    "site": ("zh", [
        "{name}的发病部位在哪里？",
        "{name}主要影响身体哪个部位？",
        "{name}是哪个部位的病？",
    ], [
        "{name}的发病部位是{sites}。",
        "{name}主要发生在{sites}。",
    ]),
    "complication": ("zh", [
        "{name}会引起哪些并发症？",
        "{name}有什么并发症？",
        "{name}不治疗会怎样？",
    ], [
        "{name}的常见并发症有{complications}。",
        "可能引起{complications}。",
    ]),
    "test": ("zh", [
        "{name}需要做哪些检查？",
        "怎么确诊{name}？",
        "怀疑{name}要查什么？",
    ], [
        "{name}常做的检查有{tests}。",
        "可以做{tests}。",
    ]),
    "symptom": ("zh", [
        "{name}有哪些症状？",
        "{name}的常见表现是什么？",
        "得了{name}会有什么感觉？",
    ], [
        "{name}的常见症状有{symptoms}。",
        "常见表现为{symptoms}。",
    ]),
}
RELATIONS = tuple(QUESTIONS)


@dataclasses.dataclass
class KGSettings:
    """How QA pairs are generated from a graph."""

    seed: int = 42
    phrasings: int = 3  # question phrasings per (disease, relation) fact
    relations: tuple[str, ...] = RELATIONS
    holdout: float = 0.0  # fraction of facts (or diseases) held out for evaluation
    holdout_by: str = "question"  # question: an unseen phrasing of a taught fact; disease: unseen diseases

    def __post_init__(self) -> None:
        if isinstance(self.relations, str):
            self.relations = tuple(r.strip() for r in self.relations.split(",") if r.strip())
        unknown = [r for r in self.relations if r not in QUESTIONS]
        if unknown or not self.relations:
            raise DataError(f"unknown relation(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(RELATIONS)}")
        if self.phrasings < 1:
            raise DataError(f"phrasings must be >= 1, got {self.phrasings}")
        if not 0 <= self.holdout < 1:
            raise DataError(f"holdout must be in [0, 1), got {self.holdout}")
        if self.holdout_by not in ("question", "disease"):
            raise DataError(f"holdout_by must be 'question' or 'disease', got {self.holdout_by!r}")
        if self.holdout and self.holdout_by == "question" and self.phrasings < 2:
            raise DataError("holdout by question needs phrasings >= 2 (one phrasing is held out, one is taught)")


def _join(items: list[str]) -> str:
    return "、".join(items)


def _fact_values(record: DiseaseRecord, relation: str, graph: KnowledgeGraph) -> dict[str, str] | None:
    """The template slots of one fact, or None when the record lacks what the relation needs."""
    dept = record.departments[0] if record.departments else ""
    values = {"name": record.name, "english": record.english, "department": dept}
    need = {
        "department": dept, "symptom_disease": record.symptoms and dept, "drug": record.drugs,
        "site": record.sites, "complication": record.complications, "test": record.tests, "symptom": record.symptoms,
        "department_en": record.english and graph.departments_en.get(dept),
    }[relation]
    if not need:
        return None
    values.update(drugs=_join(record.drugs), sites=_join(record.sites), complications=_join(record.complications),
                  tests=_join(record.tests), symptoms=_join(record.symptoms),
                  department_en=graph.departments_en.get(dept, ""))
    return values


def _answers(record: DiseaseRecord, relation: str, graph: KnowledgeGraph, shown: list[str]) -> list[str]:
    """Gold entities: a generated answer is right when it contains any of them."""
    dept = record.departments[0] if record.departments else ""
    if relation == "department":
        return [dept]
    if relation == "department_en":
        return [graph.departments_en[dept]]
    if relation == "symptom_disease":
        # Every disease whose symptoms include all the symptoms asked about is a right answer.
        return [r.name for r in graph.records if set(shown) <= set(r.symptoms)]
    return {"drug": record.drugs, "site": record.sites, "complication": record.complications,
            "test": record.tests, "symptom": record.symptoms}[relation]


def generate_pairs(graph: KnowledgeGraph, settings: KGSettings) -> tuple[list[dict], list[dict]]:
    """All QA pairs of ``graph`` -> (train, held_out), deterministic for a seed."""
    rng = random.Random(settings.seed)
    train: list[dict] = []
    held: list[dict] = []
    held_diseases: set[str] = set()
    if settings.holdout and settings.holdout_by == "disease":
        names = [r.name for r in graph.records]
        count = max(1, round(len(names) * settings.holdout))
        held_diseases = set(rng.sample(names, count))
    for index, record in enumerate(graph.records, start=1):
        for relation in settings.relations:
            values = _fact_values(record, relation, graph)
            if values is None:
                continue
            lang, questions, answers = QUESTIONS[relation]
            count = min(settings.phrasings, len(questions))
            chosen = rng.sample(questions, count)
            pairs = []
            for question in chosen:
                slots = dict(values)
                shown = record.symptoms
                if relation == "symptom_disease":
                    # A different subset of 2-3 symptoms for each phrasing, in the graph's order.
                    size = min(len(record.symptoms), rng.choice((2, 3)))
                    picked = set(rng.sample(record.symptoms, size))
                    shown = [s for s in record.symptoms if s in picked]
                    slots["symptoms"] = _join(shown)
                pairs.append({
                    "instruction": question.format(**slots),
                    "input": "",
                    "output": rng.choice(answers).format(**slots),
                    "relation": relation,
                    "answers": _answers(record, relation, graph, shown),
                    "lang": lang,
                    "source": {"file": Path(graph.path).name, "where": record.source, "record": index,
                               "中心词": record.name, "data": record.raw},
                })
            if record.name in held_diseases:
                held.extend(pairs)
            elif settings.holdout and settings.holdout_by == "question" and len(pairs) > 1 \
                    and rng.random() < settings.holdout:
                held.append(pairs[-1])
                train.extend(pairs[:-1])
            else:
                train.extend(pairs)
    return train, held


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    """Write one JSON object a line, through a temporary file renamed into place."""
    write_jsonl_atomic(path, rows)


TABLE_COLUMNS = ("disease", "english_name", "department", "site", "symptoms", "tests", "drugs", "complications")


def write_disease_table(graph: KnowledgeGraph, path: str | Path) -> int:
    """The graph as a ChatDoctor-style disease table (CSV, lists joined with 、) for retrieval."""
    with atomic_file(path, newline="") as f:
        writer = csv.writer(f)
        writer.writerow(TABLE_COLUMNS)
        for r in graph.records:
            drugs = r.drugs + [t for t in r.treatments if t not in r.drugs]
            writer.writerow([r.name, r.english, _join(r.departments), _join(r.sites), _join(r.symptoms),
                             _join(r.tests), _join(drugs), _join(r.complications)])
    return len(graph.records)


def heldout_path(out: str | Path) -> Path:
    """Where the held-out questions go by default: qa.jsonl -> qa.heldout.jsonl."""
    out = Path(out)
    return out.with_name(out.stem + ".heldout" + (out.suffix or ".jsonl"))


def from_kg(graph_path: str | Path, out: str | Path, settings: KGSettings, holdout_out: str | Path | None = None,
            table: str | Path | None = None) -> str:
    """Generate QA pairs from a graph file into ``out`` (held-out questions and a disease table too, when
    asked); returns what was made, ending in a table of pairs per relation."""
    targets = [Path(out)] + ([Path(holdout_out or heldout_path(out))] if settings.holdout else []) \
        + ([Path(table)] if table else [])
    for i, target in enumerate(targets):  # checked before any work, so nothing is written when one is wrong
        check_output_path(target, graph_path)
        if any(target.resolve() == t.resolve() or same_file(target, t) for t in targets[:i]):
            raise FinechatError(f"{target}: the QA pairs, held-out questions and disease table need three files")
    graph = load_graph(graph_path)
    train, held = generate_pairs(graph, settings)
    write_jsonl(train, out)
    lines = [f"{len(graph.records)} diseases from {graph.path} -> {len(train)} QA pairs in {out}"]
    if settings.holdout:
        target = holdout_out or heldout_path(out)
        write_jsonl(held, target)
        lines.append(f"{len(held)} held-out questions (by {settings.holdout_by}) in {target}")
    if table:
        lines.append(f"{write_disease_table(graph, table)} rows in disease table {table}")
    return "\n".join(lines) + "\n" + relation_table(train, held)


def relation_table(train: list[dict], held: list[dict]) -> str:
    """Pairs per relation, as a Markdown table."""
    rows = ["| relation | train | held out |", "|---|---|---|"]
    for relation in RELATIONS:
        a = sum(1 for p in train if p["relation"] == relation)
        b = sum(1 for p in held if p["relation"] == relation)
        if a or b:
            rows.append(f"| {relation} | {a} | {b} |")
    rows.append(f"| total | {len(train)} | {len(held)} |")
    return "\n".join(rows)

"""Medical evaluation: held-out knowledge-graph questions (exact match of the right entity) and Rouge/BLEU.

The questions come from ``finechat data from-kg --holdout`` (``finechat.medical.kg``): each row has the
question (``instruction``), the reference answer (``output``), its ``relation`` and ``answers``, the gold
entities. A generated answer is *right* when it contains one of them after lower-casing and removing
spaces: the right department, the right disease for the symptoms, one of the right drugs, ... (the
answer may say more; it must name the entity). Accuracy is reported overall and per relation, with
Rouge-1/2/L and BLEU-4 against the reference answers from :mod:`finechat.eval.metrics`.

A general set (any data file ``finechat eval`` reads) scored with Rouge/BLEU before and after tuning
shows what the domain stages cost elsewhere (forgetting). :func:`medical_table` puts every stage's
numbers in one table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from finechat.console import log
from finechat.data.records import json_lines
from finechat.errors import DataError
from finechat.eval.metrics import compute_metrics, format_table
from finechat.eval.predict import generate_answers, load_examples, predict
from finechat.files import write_json_atomic, write_jsonl_atomic, write_text_atomic
from finechat.generate.chat_loader import load
from finechat.generate.contract import ChatEngine
from finechat.generate.settings import GenerationSettings
from finechat.train.stages import STATE_FILE, main_stages, resolve_stages

# Relations shown as their own accuracy column, in this order, with short column names.
RELATION_COLUMNS = {
    "department": "acc-dept", "department_en": "acc-dept-en", "symptom_disease": "acc-disease",
    "drug": "acc-drug", "site": "acc-site", "complication": "acc-compl", "test": "acc-test", "symptom": "acc-symptom",
}


def load_kg_questions(path: str | Path, max_samples: int | None = None) -> list[dict]:
    """Rows of a held-out file from ``finechat data from-kg`` (each needs instruction, output, answers)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows = []
    for number, row in json_lines(path.read_text(encoding="utf-8"), path):
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: expected an object with instruction, output and answers")
        for key in ("instruction", "output", "answers"):
            if key not in row:
                raise DataError(f"{path}:{number}: missing field {key!r} (make the file with finechat data from-kg)")
        if not isinstance(row["answers"], list) or not all(isinstance(a, str) and a for a in row["answers"]):
            raise DataError(f"{path}:{number}: field 'answers' must be a list of non-empty strings")
        rows.append(row)
        if max_samples and len(rows) >= max_samples:
            break
    if not rows:
        raise DataError(f"{path}: no questions")
    return rows


def _normal(text: str) -> str:
    return "".join(text.lower().split())


def entity_hit(prediction: str, answers: list[str]) -> bool:
    """True when the prediction names one of the gold entities."""
    pred = _normal(prediction)
    return any(_normal(a) in pred for a in answers if a.strip())


def score_kg(predictions: list[str], rows: list[dict]) -> dict[str, Any]:
    """Accuracy (%) overall and per relation, plus Rouge/BLEU against the reference answers."""
    hits = [entity_hit(p, r["answers"]) for p, r in zip(predictions, rows)]
    out: dict[str, Any] = {"accuracy": 100.0 * sum(hits) / len(hits) if hits else 0.0}
    for relation, column in RELATION_COLUMNS.items():
        chosen = [h for h, r in zip(hits, rows) if r.get("relation") == relation]
        if chosen:
            out[column] = 100.0 * sum(chosen) / len(chosen)
    out.update(compute_metrics(predictions, [r["output"] for r in rows]))
    return out


def kg_messages(row: dict) -> list[dict]:
    content = row["instruction"] + (f"\n{row['input']}" if row.get("input") else "")
    return [{"role": "user", "content": content}]


def evaluate_kg(bot: ChatEngine, rows: list[dict], batch_size: int = 8, max_new_tokens: int = 48,
                progress: bool = True) -> tuple[dict, list[dict]]:
    """Greedy answers to the questions and their scores; returns (metrics, prediction records)."""
    settings = GenerationSettings(greedy=True, max_new_tokens=max_new_tokens)
    answers = generate_answers(bot, [kg_messages(r) for r in rows], settings, batch_size, progress)
    metrics = score_kg(answers, rows)
    records = [{"prompt": r["instruction"], "predict": a, "label": r["output"], "relation": r.get("relation"),
                "answers": r["answers"], "correct": entity_hit(a, r["answers"]),
                "source": (r.get("source") or {}).get("where")} for r, a in zip(rows, answers)]
    return metrics, records


def evaluate_general(bot: ChatEngine, path: str | Path, batch_size: int = 8, max_new_tokens: int = 48,
                     max_samples: int | None = None, progress: bool = True) -> dict:
    """Rouge/BLEU on a general set (forgetting check)."""
    examples = load_examples(path, max_samples=max_samples)
    settings = GenerationSettings(greedy=True, max_new_tokens=max_new_tokens)
    metrics, _ = predict(bot, examples, settings=settings, batch_size=batch_size, with_loss=False,
                         progress=progress)
    return metrics


def medical_table(rows: dict[str, dict]) -> str:
    """One table: per stage, KG accuracy (overall and per relation), KG Rouge-L / BLEU-4, general Rouge-L / BLEU-4.

    ``rows`` maps a stage name to ``{"kg": score_kg(...), "general": compute_metrics(...)}`` (either may
    be missing).
    """
    flat: dict[str, dict] = {}
    for name, parts in rows.items():
        kg, general = parts.get("kg") or {}, parts.get("general") or {}
        row: dict[str, Any] = {}
        if kg:
            row["kg-acc"] = kg.get("accuracy")
            row.update({c: kg[c] for c in RELATION_COLUMNS.values() if c in kg})
            row["kg-rouge-l"] = kg.get("rouge-l")
            row["kg-bleu-4"] = kg.get("bleu-4")
        if general:
            row["general-rouge-l"] = general.get("rouge-l")
            row["general-bleu-4"] = general.get("bleu-4")
        flat[name] = row
    columns = ["kg-acc", *[c for c in RELATION_COLUMNS.values() if any(c in r for r in flat.values())],
               "kg-rouge-l", "kg-bleu-4", "general-rouge-l", "general-bleu-4"]
    columns = [c for c in columns if any(r.get(c) is not None for r in flat.values())]
    return format_table(flat, columns, first="stage")


# -- the medical recipe: multi-stage training, then every stage scored on the KG questions ------------------
MEDICAL_STATE = "medical_eval.json"


def kg_eval(model: str, adapter: str | None, questions: list[dict], template: str | None, out_dir: Path,
            batch_size: int = 8, max_new_tokens: int = 48) -> dict:
    """Load one model (+ adapter), answer the KG questions, write its predictions; return the scores."""
    bot = load(model, adapter=adapter, template=template)
    metrics, records = evaluate_kg(bot, questions, batch_size=batch_size, max_new_tokens=max_new_tokens)
    write_records(out_dir, records, metrics)
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def write_records(out_dir: Path, records: list[dict], metrics: dict) -> None:
    """kg_predictions.jsonl (one answer per question, with ``correct``) and kg_metrics.json."""
    write_jsonl_atomic(out_dir / "kg_predictions.jsonl", records)
    write_json_atomic(out_dir / "kg_metrics.json", metrics)


def stages_output(config_file: str, overrides: list[str]) -> tuple[Any, list[str]]:
    """The StagesConfig a ``finechat train STAGES.yaml key=value ...`` run uses (same override rules)."""
    return resolve_stages(config_file, overrides)


def run_medical_recipe(config_file: str, overrides: list[str], questions_file: str, max_questions: int | None = None,
                       max_new_tokens: int = 48, batch_size: int = 8) -> str:
    """Train every stage of a ``stages:`` recipe, then score the base and each stage on the KG questions.

    The KG scores are kept in ``OUTPUT_DIR/medical_eval.json`` per (stage, checkpoint), so a rerun after a
    crash or with more stages only scores what is new. Returns the table (also written to
    ``OUTPUT_DIR/medical_summary.md``).
    """
    questions = load_kg_questions(questions_file, max_questions)
    cfg, _ = stages_output(config_file, overrides)  # validate before the (long) training starts
    t0 = time.time()
    main_stages(config_file, overrides)
    train_seconds = time.time() - t0
    out = Path(cfg.output_dir)
    state = json.loads((out / STATE_FILE).read_text(encoding="utf-8"))
    template = (cfg.defaults or {}).get("template")
    cache_path = out / MEDICAL_STATE
    cache = json.loads(cache_path.read_text(encoding="utf-8")) if cache_path.is_file() else {}
    points = [("base", cfg.model, None, out / "medical_before")]
    for i, raw in enumerate(cfg.stages):
        name = str(raw.get("name", f"stage{i + 1}"))
        record = state["stages"][name]
        points.append((f"{i + 1}. {name}", record["next_model"], record["next_adapter"],
                       out / f"{i + 1:02d}-{name}" / "medical_eval"))
    rows: dict[str, dict] = {}
    for label, model, adapter, folder in points:
        key = f"{label}|{model}|{adapter}|{questions_file}|{len(questions)}|{max_new_tokens}"
        if key not in cache:
            log(f"medical eval: {label}: {len(questions)} knowledge-graph questions ...")
            cache[key] = kg_eval(model, adapter, questions, template, folder, batch_size, max_new_tokens)
            write_text_atomic(cache_path, json.dumps(cache, indent=2, ensure_ascii=False) + "\n")
        rows[label] = {"kg": cache[key]}
    if state.get("general_before"):
        rows["base"]["general"] = state["general_before"]
    for i, raw in enumerate(cfg.stages):
        name = str(raw.get("name", f"stage{i + 1}"))
        if state["stages"][name].get("general"):
            rows[f"{i + 1}. {name}"]["general"] = state["stages"][name]["general"]
    table = medical_table(rows)
    wall = time.time() - t0
    text = (f"{table}\n\nkg-*: {len(questions)} held-out knowledge-graph questions from {questions_file} "
            f"(accuracy = the answer names the right entity, %); general-*: the eval_general set.\n"
            f"wall time: {wall / 60:.1f} min ({train_seconds / 60:.1f} min training and general eval, "
            f"{(wall - train_seconds) / 60:.1f} min KG eval)")
    write_text_atomic(out / "medical_summary.md", text + "\n")
    return text

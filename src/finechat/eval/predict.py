"""Generate an answer for every example of a data set and score it: ``generated_predictions.jsonl`` + ``metrics.json``.

The prompts and the stop rules are those of :class:`finechat.generate.engine.ChatModel` (``build_prompt``,
``encode_prompt``, ``stop_token_ids``, ``stop_strings``, ``postprocess``), so an evaluated answer is the
answer ``finechat chat`` gives. Generation is batched: prompts are sorted by length (less padding), padded
on the left, and run through transformers' ``generate``; greedy by default, so scores repeat. The eval loss
is the teacher-forced cross-entropy of the label tokens (answer + end-of-turn marker, as trained), averaged
over tokens; perplexity is its exponential.

Files written (the same names ChatGLM-6B's ptuning and LLaMA-Factory use, so their tools read ours):
``generated_predictions.jsonl`` — one ``{"prompt", "predict", "label"}`` per line, in data order — and
``metrics.json``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from finechat.console import log
from finechat.data.formats import read_conversations
from finechat.data.records import json_lines
from finechat.data.templates import Message
from finechat.data.tokenize import TokenizeSettings, tokenize_conversation
from finechat.errors import DataError
from finechat.eval.metrics import compute_metrics, perplexity
from finechat.files import write_json_atomic, write_jsonl_atomic
from finechat.generate.contract import ChatEngine
from finechat.generate.engine import ChatModel
from finechat.generate.sampling import generate_kwargs, seeded_global_rng
from finechat.generate.settings import GenerationSettings

PREDICTIONS_FILE = "generated_predictions.jsonl"
METRICS_FILE = "metrics.json"


@dataclasses.dataclass
class EvalExample:
    """A prompt (messages ending with a user turn) and the reference answer."""

    messages: list[Message]
    label: str
    source: str = ""  # file:line, for messages about this example

    @property
    def query(self) -> str:
        return self.messages[-1]["content"] if self.messages else ""


# -- reading data ----------------------------------------------------------------------------------------
def examples_from_conversations(conversations: list[Any]) -> list[EvalExample]:
    """Each conversation's last assistant turn is the label; everything before it is the prompt."""
    examples = []
    for conv in conversations:
        messages = conv.messages()
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None or not any(m["role"] == "user" for m in messages[:last]):
            raise DataError(f"{conv.where}: the conversation has no user prompt and assistant answer to compare")
        examples.append(EvalExample([dict(m) for m in messages[:last]], messages[last]["content"], conv.where))
    return examples


def load_examples(path: str | Path, data_format: str = "auto", max_samples: int | None = None,
                  on_bad_record: str = "error", **columns: Any) -> list[EvalExample]:
    """Read any data file finechat reads (alpaca, ADGEN's content/summary, sharegpt, ...) as examples.

    Bad records are an error naming file and line, or (``on_bad_record="skip"``) skipped and listed.
    """
    result = read_conversations(path, format=data_format or "auto", on_bad_record=on_bad_record, **columns)
    if result.skipped:
        log(result.skipped_table())
    conversations = result.conversations[:max_samples] if max_samples else result.conversations
    if not conversations:
        raise DataError(f"{path}: no examples to evaluate")
    return examples_from_conversations(conversations)


# -- generation ------------------------------------------------------------------------------------------
def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="ex", disable=not enabled, dynamic_ncols=True)


def generate_answers(bot: ChatEngine, prompts: list[list[Message]], settings: GenerationSettings | None = None,
                     batch_size: int = 8, progress: bool = True) -> list[str]:
    """Greedy (or sampled) answers for many prompts at once, cut at the template's stops like ``bot.chat``."""
    import torch

    settings = settings or GenerationSettings(greedy=True)
    tokenizer, model = bot.tokenizer, bot.model
    if not isinstance(model, torch.nn.Module):  # an engine of its own (llama.cpp): one prompt at a time through it
        bar = _progress(len(prompts), "Generating", progress)
        answers = []
        for messages in prompts:
            answers.append(bot.chat_messages(messages, **dataclasses.asdict(settings)))
            bar.update(1)
        bar.close()
        return answers
    encoded = [bot.encode_prompt(bot.build_prompt(m)) for m in prompts]
    stop_ids = bot.stop_token_ids()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop_ids or [0])[0]
    stops = bot.stop_strings(settings)
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
    answers: list[str] = [""] * len(encoded)
    bar = _progress(len(encoded), "Generating", progress)
    with seeded_global_rng(settings.seed, device):  # sampling from a seed; the caller's random state kept
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in rows)
            # Left padding: every prompt ends at the same column, so new tokens line up. [batch, width]
            input_ids = torch.tensor([[pad_id] * (width - len(encoded[i])) + encoded[i] for i in rows], device=device)
            attention_mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in rows],
                                          device=device)
            kwargs = generate_kwargs(settings, width, stop_ids, pad_id)
            kwargs.update(input_ids=input_ids, attention_mask=attention_mask)
            with torch.inference_mode():
                output = model.generate(**kwargs)  # [batch, width + new]
            for row, i in enumerate(rows):
                new_ids = output[row, width:].tolist()
                ended = next((k for k, t in enumerate(new_ids) if t in stop_ids), None)
                text = tokenizer.decode(new_ids if ended is None else new_ids[:ended], skip_special_tokens=True)
                if ended is None:
                    text = text.rstrip("\ufffd")  # the token budget ended inside a multi-byte character
                cut = min((text.find(s) for s in stops if s and s in text), default=None)
                text = text if cut is None else text[:cut]
                answers[i] = bot.postprocess(text.rstrip("\ufffd"))  # a character cut in half by max_new_tokens
            bar.update(len(rows))
    bar.close()
    return answers


def label_token_ids(bot: ChatEngine, messages: list[Message], label: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of prompt + answer, -100 on the prompt: the training tokenization of the last turn."""
    row = tokenize_conversation(messages + [{"role": "assistant", "content": label}], bot.tokenizer, bot.template,
                                TokenizeSettings(cutoff_len=1 << 30, last_turn_only=True))
    if row is None:  # nothing to score (an empty answer under a template with no end marker)
        return [], []
    return row["input_ids"], row["labels"]


def eval_loss(bot: ChatEngine, examples: list[EvalExample], batch_size: int = 8, progress: bool = True) -> float | None:
    """Mean cross-entropy per label token (teacher forcing), over all examples."""
    import torch

    model = bot.model
    if not isinstance(model, torch.nn.Module):
        log("eval loss: not measured, it needs the PyTorch model (this one runs on another engine)")
        return None
    device = next(model.parameters()).device
    pairs = [p for p in (label_token_ids(bot, e.messages, e.label) for e in examples) if p[0]]
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]))
    total, count = 0.0, 0
    pad_id = bot.tokenizer.pad_token_id if bot.tokenizer.pad_token_id is not None else 0
    bar = _progress(len(pairs), "Eval loss", progress)
    for start in range(0, len(order), batch_size):
        rows = [pairs[i] for i in order[start:start + batch_size]]
        width = max(len(ids) for ids, _ in rows)
        # Right padding here: no generation follows. [batch, width]
        input_ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in rows], device=device)
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows], device=device)
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows], device=device)
        with torch.inference_mode():
            logits = model(input_ids=input_ids, attention_mask=mask).logits.float()  # [batch, width, vocab]
        targets = labels[:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += float(losses)
        count += int((targets != -100).sum())
        bar.update(len(rows))
    bar.close()
    return total / count if count else None


# -- the whole evaluation --------------------------------------------------------------------------------
def predict(bot: ChatEngine, examples: list[EvalExample], output_dir: str | Path | None = None,
            settings: GenerationSettings | None = None, batch_size: int = 8, with_loss: bool = True,
            progress: bool = True, info: dict | None = None) -> tuple[dict, list[dict]]:
    """Generate, score and (with ``output_dir``) write both files; returns (metrics, prediction records)."""
    settings = settings or GenerationSettings(greedy=True)
    t0 = time.time()
    answers = generate_answers(bot, [e.messages for e in examples], settings, batch_size, progress)
    seconds = time.time() - t0
    metrics: dict[str, Any] = compute_metrics(answers, [e.label for e in examples])
    if with_loss:
        loss = eval_loss(bot, examples, batch_size, progress)
        metrics["eval_loss"] = loss
        metrics["perplexity"] = perplexity(loss)
    metrics["generation_seconds"] = round(seconds, 2)
    metrics["samples_per_second"] = round(len(examples) / seconds, 3) if seconds > 0 else None
    metrics["generation"] = {k: v for k, v in dataclasses.asdict(settings).items() if v not in (None, [])}
    metrics.update(info or {})
    records = [
        {"prompt": e.query, "predict": a, "label": e.label, **({"history": e.messages[:-1]} if len(e.messages) > 1 else {})}
        for e, a in zip(examples, answers)
    ]
    if output_dir is not None:
        write_outputs(output_dir, records, metrics)
    return metrics, records


def write_outputs(output_dir: str | Path, records: list[dict], metrics: dict) -> None:
    out = Path(output_dir)
    write_jsonl_atomic(out / PREDICTIONS_FILE, records)
    write_json_atomic(out / METRICS_FILE, metrics)


# -- re-scoring a predictions file -------------------------------------------------------------------------
def read_predictions(path: str | Path) -> list[dict]:
    """Read ours ({prompt, predict, label}), ChatGLM-6B ptuning's ({labels, predict}) or LLaMA-Factory's file.

    Returns records with ``predict`` and ``label`` (and ``prompt`` when present). Errors name file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"predictions file not found: {path}")
    records = []
    for n, obj in json_lines(path.read_text(encoding="utf-8"), path):
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{n}: expected an object with 'predict' and 'label' (or 'labels')")
        label = obj.get("label", obj.get("labels"))
        if "predict" not in obj:
            raise DataError(f"{path}:{n}: missing field 'predict'")
        if label is None:
            raise DataError(f"{path}:{n}: missing field 'label' (or 'labels')")
        for name, value in (("predict", obj["predict"]), ("label", label)):
            if not isinstance(value, str):
                raise DataError(f"{path}:{n}: field '{name}' must be text, got {type(value).__name__}")
        records.append({"prompt": obj.get("prompt", ""), "predict": obj["predict"], "label": label})
    if not records:
        raise DataError(f"{path}: no predictions")
    return records


def rescore(path: str | Path) -> dict:
    """Metrics of an existing predictions file, without loading a model."""
    records = read_predictions(path)
    return compute_metrics([r["predict"] for r in records], [r["label"] for r in records])


def predict_after_training(model: Any, tokenizer: Any, template: Any, path: str, output_dir: str, cfg: Any) -> dict:
    """``do_predict`` at the end of ``finechat train``: answers for ``path`` with the trained model.

    Writes ``generated_predictions.jsonl`` and ``metrics.json`` into ``output_dir`` and returns the metrics
    with a ``predict_`` prefix (as ChatGLM-6B's ptuning names them). Only rank 0 generates.
    """
    import os

    if int(os.environ.get("RANK", 0)) != 0:
        return {}
    columns = {k: getattr(cfg, k, None) for k in ("prompt_column", "response_column", "history_column")}
    examples = load_examples(path, getattr(cfg, "format", "auto"), None, getattr(cfg, "on_bad_record", "error"),
                             **{k: v for k, v in columns.items() if v})
    was_training = model.training
    model.eval()
    bot = ChatModel(model, tokenizer, template)
    max_new = getattr(cfg, "max_target_length", None) or 128
    settings = GenerationSettings(greedy=True, max_new_tokens=max_new)
    metrics, _ = predict(bot, examples, output_dir, settings, getattr(cfg, "per_device_eval_batch_size", 8),
                         with_loss=False, info={"data": str(path)})
    if was_training:
        model.train()
    return {f"predict_{k}": v for k, v in metrics.items()
            if k in ("bleu-4", "rouge-1", "rouge-2", "rouge-l", "n", "empty_predictions", "generation_seconds")}

"""GLM's pretraining objective, autoregressive blank infilling, on plain-text documents.

One example (Du et al. 2022, "GLM"; THUDM/GLM ``blocklm_utils.py``):

- **Part A** is the document with some spans each replaced by a single mask token; it is read
  bidirectionally. **Part B** holds the spans in shuffled order, each as ``<sop> + span`` with targets
  ``span + <eop>``; it is causal and sees all of Part A. The loss is on Part B only.
- Positions are 2D: a Part B token's ``position_id`` is its span's mask position in Part A and its
  ``block_position_id`` counts 1, 2, ... inside the span (Part A: positions 0..n-1, block position 0).
- Three modes, mixed by configurable probabilities: **token** ([MASK]): span lengths from Poisson(λ=3)
  (truncated to 1..max_span_length), drawn until 15% of the tokens are masked, placed without overlap
  (at least one token between spans); **sentence** ([sMASK]): whole sentences until 15%; **document**
  ([gMASK]): one span of 50-100% of the tokens at the end (the form ChatGLM answers in).

The ChatGLM model builds its attention mask from the ids (Part A = everything before the first ``<sop>``),
so an example only carries ``input_ids``, 2D ``position_ids`` and ``labels``. Labels follow transformers'
shift-by-one convention (``labels[t + 1]`` is what position t must predict), so one trailing ``<eop>`` input
carries the last target. transformers has no GLM data collator, hence this module.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from typing import Any

from finechat.data.documents import read_documents
from finechat.errors import ConfigError, DataError

IGNORE_INDEX = -100
MODES = ("token", "sentence", "document")
_SENTENCE_END = re.compile(r"(?<=[。！？!?.;；\n])")


@dataclasses.dataclass
class BlankInfillingSettings:
    """How blanks are drawn; the defaults follow the GLM paper."""

    mask_ratio: float = 0.15
    poisson_lambda: float = 3.0
    max_span_length: int = 40
    token_prob: float = 0.6
    sentence_prob: float = 0.2
    document_prob: float = 0.2
    document_min: float = 0.5
    document_max: float = 1.0
    max_length: int = 512
    seed: int = 42

    def __post_init__(self) -> None:
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        probs = (self.token_prob, self.sentence_prob, self.document_prob)
        if min(probs) < 0 or sum(probs) <= 0:
            raise ValueError(f"mode probabilities must be >= 0 with a positive sum, got {probs}")
        if not 0 < self.document_min <= self.document_max <= 1:
            raise ValueError("need 0 < document_min <= document_max <= 1")
        if self.max_length < 8:
            raise ValueError(f"max_length must be >= 8, got {self.max_length}")


@dataclasses.dataclass
class SpecialIds:
    mask: int
    smask: int
    gmask: int
    sop: int
    eop: int

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> SpecialIds:
        def get(*names: str) -> int | None:
            for name in names:
                value = getattr(tokenizer, name, None)
                if isinstance(value, int):
                    return value
            return None

        def piece(token: str) -> int | None:
            index = tokenizer.convert_tokens_to_ids(token)
            return index if isinstance(index, int) and index != tokenizer.unk_token_id else None

        ids = {
            "mask": get("mask_token_id") or piece("[MASK]"),
            "smask": get("smask_token_id") or piece("[sMASK]"),
            "gmask": get("gmask_token_id") or piece("[gMASK]"),
            "sop": get("bos_token_id") if piece("<sop>") is None else piece("<sop>"),
            "eop": get("eos_token_id") if piece("<eop>") is None else piece("<eop>"),
        }
        missing = [k for k, v in ids.items() if v is None]
        if missing:
            raise DataError(f"blank infilling needs a GLM tokenizer with [MASK], [sMASK], [gMASK], <sop> and <eop> "
                            f"(ChatGLM's); this one lacks: {', '.join(missing)}")
        return cls(**ids)


def _poisson_weights(lam: float, max_len: int) -> list[float]:
    """Poisson(lam) probabilities of lengths 1..max_len (GLM draws span lengths from this, truncated)."""
    return [math.exp(-lam) * lam ** k / math.factorial(k) for k in range(1, max_len + 1)]


def sample_token_spans(n: int, rng: random.Random, s: BlankInfillingSettings) -> list[tuple[int, int]]:
    """Non-overlapping [start, end) spans, Poisson lengths, until mask_ratio of n tokens is covered."""
    target = max(1, round(n * s.mask_ratio))
    weights = _poisson_weights(s.poisson_lambda, s.max_span_length)
    lengths: list[int] = []
    while sum(lengths) < target:
        length = rng.choices(range(1, s.max_span_length + 1), weights)[0]
        length = min(length, target - sum(lengths))  # stop at the ratio instead of overshooting it
        if sum(lengths) + length + len(lengths) + 1 > n:  # spans need a token between them
            break
        lengths.append(length)
    if not lengths:
        return []
    rng.shuffle(lengths)
    # GLM's sample_spans: spread the unmasked tokens over the gaps, at least one between two spans.
    free = n - sum(lengths) - (len(lengths) - 1)
    places = sorted(rng.randrange(free + 1) for _ in lengths)
    spans, offset = [], 0
    for place, length in zip(places, lengths):
        start = offset + place
        spans.append((start, start + length))
        offset += length + 1
    return spans


def sample_sentence_spans(sentence_bounds: list[tuple[int, int]], n: int, rng: random.Random,
                          s: BlankInfillingSettings) -> list[tuple[int, int]]:
    """Whole sentences, in random order, until mask_ratio of the tokens is covered (at least one)."""
    target = max(1, round(n * s.mask_ratio))
    order = list(range(len(sentence_bounds)))
    rng.shuffle(order)
    chosen, covered = [], 0
    for i in order:
        if covered >= target:
            break
        start, end = sentence_bounds[i]
        if end - start >= n:  # never mask the whole document in sentence mode
            continue
        chosen.append((start, end))
        covered += end - start
    return sorted(chosen)


def build_example(tokens: list[int], spans: list[tuple[int, int]], mask_id: int, ids: SpecialIds,
                  rng: random.Random) -> dict:
    """Part A / Part B layout for ``tokens`` with ``spans`` blanked (each replaced by ``mask_id``)."""
    part_a: list[int] = []
    mask_at: dict[tuple[int, int], int] = {}
    cursor = 0
    for start, end in spans:
        part_a += tokens[cursor:start]
        mask_at[(start, end)] = len(part_a)
        part_a.append(mask_id)
        cursor = end
    part_a += tokens[cursor:]
    input_ids = list(part_a)
    positions = list(range(len(part_a)))
    blocks = [0] * len(part_a)
    targets = [IGNORE_INDEX] * len(part_a)
    order = list(spans)
    rng.shuffle(order)
    for start, end in order:
        span = tokens[start:end]
        input_ids += [ids.sop] + span
        targets += span + [ids.eop]
        positions += [mask_at[(start, end)]] * (len(span) + 1)
        blocks += list(range(1, len(span) + 2))
    # One trailing <eop> input so that, with labels shifted by one, the last target is kept.
    input_ids.append(ids.eop)
    positions.append(positions[-1])
    blocks.append(blocks[-1] + 1)
    labels = [IGNORE_INDEX] + targets
    return {"input_ids": input_ids, "labels": labels, "position_ids": [positions, blocks],
            "part_a_length": len(part_a)}


class BlankInfillingBuilder:
    """Turns token sequences (with sentence boundaries) into GLM examples; deterministic for a seed."""

    def __init__(self, tokenizer: Any, settings: BlankInfillingSettings | None = None):
        self.tokenizer = tokenizer
        self.settings = settings or BlankInfillingSettings()
        self.ids = SpecialIds.from_tokenizer(tokenizer)
        self.rng = random.Random(self.settings.seed)
        self._special = set(vars(self.ids).values()) | set(getattr(tokenizer, "all_special_ids", []))

    def tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``text`` (special ids dropped) and each sentence's [start, end)."""
        tokens: list[int] = []
        bounds: list[tuple[int, int]] = []
        for sentence in _SENTENCE_END.split(text):
            if not sentence.strip():
                continue
            piece = [t for t in self.tokenizer(sentence, add_special_tokens=False)["input_ids"]
                     if t not in self._special]
            if piece:
                bounds.append((len(tokens), len(tokens) + len(piece)))
                tokens += piece
        return tokens, bounds

    def chunks(self, text: str) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """Cut a long document so that Part A + Part B fit max_length."""
        tokens, bounds = self.tokenize(text)
        # Part B adds 2 tokens per span (<sop>, trailing <eop>) on top of the masked tokens themselves.
        room = max(4, int(self.settings.max_length / (1 + 2 * self.settings.mask_ratio + 0.05)) - 2)
        out = []
        for start in range(0, len(tokens), room):
            piece = tokens[start:start + room]
            piece_bounds = [(max(a, start) - start, min(b, start + room) - start) for a, b in bounds
                            if a < start + room and b > start]
            if len(piece) >= 2:
                out.append((piece, piece_bounds))
        return out

    def pick_mode(self) -> str:
        s = self.settings
        return self.rng.choices(MODES, (s.token_prob, s.sentence_prob, s.document_prob))[0]

    def example(self, tokens: list[int], bounds: list[tuple[int, int]], mode: str | None = None) -> tuple[dict, str]:
        mode = mode or self.pick_mode()
        n, s = len(tokens), self.settings
        if mode == "sentence" and len(bounds) < 2:
            mode = "token"
        if mode == "document":
            fraction = self.rng.uniform(s.document_min, s.document_max)
            length = min(n - 1, max(1, round(n * fraction)))
            spans, mask_id = [(n - length, n)], self.ids.gmask
        elif mode == "sentence":
            spans, mask_id = sample_sentence_spans(bounds, n, self.rng, s), self.ids.smask
        else:
            spans, mask_id = sample_token_spans(n, self.rng, s), self.ids.mask
        example = build_example(tokens, spans, mask_id, self.ids, self.rng)
        example["mode"] = mode
        return example, mode


def blank_infilling_examples(documents: list[str], tokenizer: Any, cfg: Any = None,
                             settings: BlankInfillingSettings | None = None) -> tuple[list[dict], dict]:
    """Documents -> GLM examples ``{"input_ids", "labels", "position_ids" [2, L]}`` and counts.

    The training recipe's ``stage: pretrain`` + ``objective: blank_infilling`` calls this with its config
    (``cutoff_len`` -> max_length, ``seed``; a ``blank_infilling`` mapping of it, if present, overrides the
    other settings).
    """
    if settings is None:
        overrides = dict(getattr(cfg, "blank_infilling", None) or {})
        if cfg is not None:
            overrides.setdefault("max_length", getattr(cfg, "cutoff_len", 512))
            overrides.setdefault("seed", getattr(cfg, "seed", 42))
        try:
            settings = BlankInfillingSettings(**overrides)
        except (TypeError, ValueError) as e:
            names = ", ".join(f.name for f in dataclasses.fields(BlankInfillingSettings))
            raise ConfigError(f"blank_infilling: {e}; valid keys: {names}") from None
    builder = BlankInfillingBuilder(tokenizer, settings)
    examples: list[dict] = []
    counts = {m: 0 for m in MODES}
    skipped = 0
    for doc in documents:
        pieces = builder.chunks(doc)
        if not pieces:
            skipped += 1
            continue
        for tokens, bounds in pieces:
            example, mode = builder.example(tokens, bounds)
            counts[mode] += 1
            examples.append({k: example[k] for k in ("input_ids", "labels", "position_ids")})
    if not examples:
        raise DataError(f"blank infilling: none of the {len(documents)} documents has 2 or more tokens")
    stats = {"documents": len(documents), "examples": len(examples), "skipped_documents": skipped,
             **{f"{m}_examples": c for m, c in counts.items()}}
    return examples, stats


@dataclasses.dataclass
class BlankInfillingCollator:
    """Pads GLM examples on the right: ids with pad, labels with -100, positions with 0, mask with 0."""

    pad_token_id: int

    def __call__(self, batch: list[dict]) -> dict:
        import torch

        longest = max(len(b["input_ids"]) for b in batch)

        def pad(seq: list[int], value: int) -> list[int]:
            return list(seq) + [value] * (longest - len(seq))

        return {
            "input_ids": torch.tensor([pad(b["input_ids"], self.pad_token_id) for b in batch]),  # [b, L]
            "labels": torch.tensor([pad(b["labels"], IGNORE_INDEX) for b in batch]),  # [b, L]
            "position_ids": torch.tensor([[pad(row, 0) for row in b["position_ids"]] for b in batch]),  # [b, 2, L]
            "attention_mask": torch.tensor([pad([1] * len(b["input_ids"]), 0) for b in batch]),  # [b, L]
        }


def preview_example(text: str, tokenizer: Any, mode: str | None = None, seed: int = 0) -> str:
    """One example's layout as text: Part A, each Part B span, and a per-token table of positions."""
    builder = BlankInfillingBuilder(tokenizer, BlankInfillingSettings(seed=seed))
    pieces = builder.chunks(text)
    if not pieces:
        return "[skipped: fewer than 2 tokens]"
    tokens, bounds = pieces[0]
    ex, mode = builder.example(tokens, bounds, mode)

    def show(ids: list[int]) -> str:
        return " ".join(tokenizer.convert_ids_to_tokens(ids))

    a = ex["part_a_length"]
    masked = sum(1 for x in ex["labels"] if x != IGNORE_INDEX) - sum(1 for t in ex["input_ids"][a:] if t == builder.ids.sop)
    lines = [f"mode: {mode}; {len(tokens)} tokens, {masked} masked; Part A {a} tokens (bidirectional), "
             f"Part B {len(ex['input_ids']) - a - 1} tokens (causal, sees Part A); loss on Part B only",
             f"Part A: {show(ex['input_ids'][:a])}"]
    pos, block = ex["position_ids"]
    i = a
    while i < len(ex["input_ids"]) - 1:
        j = i + 1
        while j < len(ex["input_ids"]) - 1 and ex["input_ids"][j] != builder.ids.sop:
            j += 1
        targets = [t for t in ex["labels"][i + 1:j + 1]]
        lines.append(f"Part B span for the mask at A[{pos[i]}]: input {show(ex['input_ids'][i:j])} "
                     f"-> target {show(targets)}")
        i = j
    lines.append("")
    lines.append(f"{'idx':>4} {'token':<14} {'position':>8} {'block':>5}  target")
    for t, tok in enumerate(ex["input_ids"]):
        target = ex["labels"][t + 1] if t + 1 < len(ex["labels"]) else IGNORE_INDEX
        shown = show([target]) if target != IGNORE_INDEX else "-"
        lines.append(f"{t:>4} {show([tok]):<14} {pos[t]:>8} {block[t]:>5}  {shown}")
    return "\n".join(lines)


def preview_documents(path: str, tokenizer: Any, start: int = 0, num: int = 3, document_per: str = "line") -> str:
    """``finechat data preview --objective blank_infilling FILE``: the layout of documents start..start+num.

    FILE is read the way ``stage: pretrain`` reads it (.txt: a document per line; .json/.jsonl: ``text``).
    """
    docs = read_documents([path], document_per)
    chosen = docs[start:start + num]
    if not chosen:
        raise DataError(f"{path}: has {len(docs)} documents; nothing at --start {start}")
    parts = [f"# GLM blank infilling; {len(docs)} documents in {path}"]
    for i, doc in enumerate(chosen, start):
        parts.append(f"\n=== document {i + 1}")
        parts.append(preview_example(doc, tokenizer, seed=i))
    return "\n".join(parts)

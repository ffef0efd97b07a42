"""Tokenization for fine-tuning: conversations -> input_ids + labels, cached on disk, counted, packed, padded.

Rules (the issue's "never lose data silently"):
- labels are the token ids on trained spans and -100 elsewhere; the template decides what is trained
  (assistant content + its end marker; tool results never). ``train_on_prompt`` trains every token,
  ``last_turn_only`` only the final answer.
- length limits follow ChatGLM-6B ptuning (``max_source_length`` for the prompt, ``max_target_length`` for the
  final answer) plus one ``cutoff_len`` for the whole row. The prompt is cut from the *left* (so the answer
  header right before the answer stays), the answer from the right. Every cut is counted in
  :class:`TokenizeStats`; with ``skip_overlength`` the example is skipped (and counted) instead.
- special tokens go where ``ChatModel.encode_prompt`` puts them at inference: what the tokenizer prepends
  (a BOS) starts the row; what it appends to a prompt (ChatGLM-6B's ``[gMASK]<sop>``) goes right before the
  answer. For such a tokenizer everything before the mark is bidirectional context, so a multi-turn
  conversation becomes one example per assistant turn instead of training answers inside the context.
  A tokenizer's own Jinja chat template already writes its special tokens, so nothing is added then.

Conversations are tokenized chunk by chunk as they are read (:func:`tokenize_chunks`), so memory stays
flat in the record count; the on-disk, memory-mapped cache and ``build_dataset`` are in
``finechat.data.token_cache``.
"""

from __future__ import annotations

import dataclasses
import os
import weakref
from array import array
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from finechat.data.conversation import Conversation
from finechat.data.heap import quiet_worker
from finechat.data.segment_encoder import SegmentEncoder
from finechat.data.tool_prompt import conversation_messages, tool_prompt
from finechat.errors import ConfigError, DataError

IGNORE_INDEX = -100
# Below this many conversations one process is faster than starting workers (measured: ~1 s start-up).
PARALLEL_MIN_CONVERSATIONS = 2000
# Batched encoding already runs on every core inside the Rust tokenizer; extra processes only pay off for
# the Python template rendering when there are cores to spare (on 2 cores they were slower: benchmarks/).
PARALLEL_MIN_CORES = 4


@dataclasses.dataclass
class TokenizeSettings:
    """How conversations become training rows."""

    cutoff_len: int = 1024
    max_source_length: int | None = None
    max_target_length: int | None = None
    train_on_prompt: bool = False
    last_turn_only: bool = False
    skip_overlength: bool = False
    packing: bool = False

    def __post_init__(self) -> None:
        if self.cutoff_len < 2:
            raise ConfigError(f"cutoff_len must be at least 2, got {self.cutoff_len}")
        for name in ("max_source_length", "max_target_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")


@dataclasses.dataclass
class TokenizeStats:
    """What tokenization did: how many examples came out and which were cut or skipped."""

    conversations: int = 0
    examples: int = 0
    truncated: int = 0
    skipped_overlength: int = 0
    skipped_no_label: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    skipped_records: int = 0  # bad records skipped by the reader (on_bad_record: skip)
    bad_records: list = dataclasses.field(default_factory=list)  # each as [file, line, field, reason]
    sources: list = dataclasses.field(default_factory=list)  # each data source with the rows it gave
    from_cache: bool = False
    cache_file: str | None = None

    def add(self, other: TokenizeStats) -> None:
        for f in ("conversations", "examples", "truncated", "skipped_overlength", "skipped_no_label", "tokens",
                  "trained_tokens", "skipped_records"):
            setattr(self, f, getattr(self, f) + getattr(other, f))

    def summary(self) -> str:
        parts = [f"{self.examples} examples from {self.conversations} conversations",
                 f"{self.tokens} tokens ({self.trained_tokens} trained)"]
        if self.truncated:
            parts.append(f"{self.truncated} truncated (longer than cutoff_len or max_source/target_length: prompts "
                         "lose their start, long answers their end; raise cutoff_len to keep more)")
        if self.skipped_overlength:
            parts.append(f"{self.skipped_overlength} skipped as too long")
        if self.skipped_no_label:
            parts.append(f"{self.skipped_no_label} skipped with nothing left to train")
        if self.skipped_records:
            parts.append(f"{self.skipped_records} bad records skipped")
        if self.from_cache:
            parts.append("from cache")
        return ", ".join(parts)


# ------------------------------------------------------------------------------------------------------------
# Special tokens
# ------------------------------------------------------------------------------------------------------------

def special_token_layout(tokenizer: Any, template: Any) -> tuple[list[int], list[int]]:
    """(ids the tokenizer prepends, ids it appends to a prompt) with add_special_tokens=True; EOS excluded.

    A Jinja chat template writes its own special tokens, so both are empty then (as in encode_prompt).
    """
    if hasattr(template, "tokenizer"):
        return [], []
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    if not plain:
        return [], []
    try:
        start = next(i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain)
    except StopIteration:
        return [], []
    prefix, suffix = list(full[:start]), list(full[start + len(plain):])
    # A trailing EOS is written by the template's end marker already.
    eos = getattr(tokenizer, "eos_token_id", None)
    if suffix and suffix[-1] == eos:
        suffix = suffix[:-1]
    return prefix, suffix


# ------------------------------------------------------------------------------------------------------------
# One conversation
# ------------------------------------------------------------------------------------------------------------

def _messages(conv: Conversation | list[dict]) -> tuple[list[dict], list | None]:
    if isinstance(conv, Conversation):
        return conv.messages(), conv.tools
    if isinstance(conv, dict) and "turns" in conv:
        c = Conversation.from_dict(conv)
        return c.messages(), c.tools
    return list(conv), None


def _segments(template: Any, messages: list[dict], eos: str, tools: list | None) -> list[tuple[str, bool]]:
    if hasattr(template, "tokenizer") and tools:
        return template.segments(messages, eos, tools=tools)
    return template.segments(messages, eos)


def _encode_batch(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    # One batched call: the Rust tokenizer is several times faster on a batch than text by text.
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        # The Rust tokenizer itself: what tokenizer(texts) returns, without converting every Encoding to a
        # Python BatchEncoding (that conversion took ~40% of tokenizing time, measured in benchmarks/data_scale);
        # encode_batch_fast skips the character offsets, which nothing here reads (same ids). Pieces between
        # added tokens that repeat (a template's system prompt and headers) are encoded once (segment_encoder).
        return _segment_encoder(tokenizer, backend).encode(texts)
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


_ENCODERS: dict[int, tuple[Any, Any, int, SegmentEncoder]] = {}  # id(tokenizer) -> (weak ref, backend, ...)


def _segment_encoder(tokenizer: Any, backend: Any) -> SegmentEncoder:
    """The piece-caching encoder of this tokenizer, made again when its added tokens change."""
    n_added = len(backend.get_added_tokens_decoder())
    held = _ENCODERS.get(id(tokenizer))
    if held is None or held[0]() is not tokenizer or held[1] is not backend or held[2] != n_added:
        held = _ENCODERS[id(tokenizer)] = (weakref.ref(tokenizer), backend, n_added, SegmentEncoder(backend))
        weakref.finalize(tokenizer, _ENCODERS.pop, id(tokenizer), None)  # nothing kept once the tokenizer is gone
    return held[3]


Plan = tuple  # (texts, trained flags, index of the last trained text) or None: what one example will hold


def _plans(conv: Conversation | list[dict], tokenizer: Any, template: Any, settings: TokenizeSettings,
           mark: list[int]) -> list[Plan | None]:
    """The rendered pieces of each example a conversation gives (before tokenization)."""
    messages, tools = _messages(conv)
    return _plans_of(messages, tools, tokenizer, template, settings, mark)


def _plans_of(messages: list[dict], tools: list | None, tokenizer: Any, template: Any, settings: TokenizeSettings,
              mark: list[int]) -> list[Plan | None]:
    if tools:  # exactly the prompt chat and serve build for these tools (finechat.data.tool_prompt)
        messages, tools = tool_prompt(template, conversation_messages(messages), tools)
    only_last = (settings.last_turn_only or bool(mark)) and not settings.train_on_prompt
    if mark and not settings.last_turn_only and not settings.train_on_prompt:
        ends = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if len(ends) > 1:
            return [_plan(messages[: i + 1], tools, tokenizer, template, only_last) for i in ends]
    return [_plan(messages, tools, tokenizer, template, only_last)]


def _plan(messages: list[dict], tools: list | None, tokenizer: Any, template: Any, only_last: bool) -> Plan | None:
    eos = getattr(tokenizer, "eos_token", None) or ""
    segments = _segments(template, messages, eos, tools)
    if only_last:
        # Earlier answers are plain prompt text then: encoded with it in one piece, exactly as at inference.
        last = max((i for i, (_, trained) in enumerate(segments) if trained), default=-1)
        segments = [(text, trained and i == last) for i, (text, trained) in enumerate(segments)]
    # Merge neighbours with the same flag: one piece per prompt or answer span.
    texts: list[str] = []
    flags: list[bool] = []
    for text, trained in segments:
        if flags and flags[-1] == trained:
            texts[-1] += text
        else:
            texts.append(text)
            flags.append(trained)
    if not any(flags):
        return None
    return texts, flags, max(i for i, f in enumerate(flags) if f)


def _plan_texts(plans: list[Plan | None]) -> list[str]:
    return [t for p in plans if p is not None for t in p[0]]


def _examples_from_plans(plans: list[Plan | None], tokenizer: Any, settings: TokenizeSettings,
                         layout: tuple[list[int], list[int]], encoded_texts: list[list[int]] | None = None
                         ) -> list[tuple[dict | None, str]]:
    prefix, mark = layout
    if encoded_texts is None:
        encoded_texts = _encode_batch(tokenizer, _plan_texts(plans))
    encoded = iter(encoded_texts)
    out: list[tuple[dict | None, str]] = []
    for plan in plans:
        if plan is None:
            out.append((None, "no_label"))
            continue
        texts, flags, last = plan
        pieces = [next(encoded) for _ in texts]
        out.append(_build_example(pieces[: last + 1], flags[: last + 1], prefix, mark, settings,
                                  trailing=pieces[last + 1:]))
    return out


def encode_conversation(conv: Conversation | list[dict], tokenizer: Any, template: Any,
                        settings: TokenizeSettings, layout: tuple[list[int], list[int]] | None = None
                        ) -> list[tuple[dict | None, str]]:
    """Tokenize one conversation into ``[(example or None, status)]``.

    Status is ``ok``, ``truncated``, ``overlength`` (skipped) or ``no_label`` (skipped). Usually one item;
    one per assistant turn when the tokenizer marks where generation starts (ChatGLM-6B's ``[gMASK]<sop>``):
    each of those examples is the conversation up to that answer, rendered as at inference.
    """
    layout = layout if layout is not None else special_token_layout(tokenizer, template)
    return _examples_from_plans(_plans(conv, tokenizer, template, settings, layout[1]), tokenizer, settings, layout)


def _build_example(pieces: list[list[int]], trained: list[bool], prefix: list[int], mark: list[int],
                   settings: TokenizeSettings, trailing: list[list[int]]) -> tuple[dict | None, str]:
    """Assemble source (prompt + earlier turns) and target (the final answer), apply limits, build labels."""
    *source_pieces, target = pieces
    train_earlier = settings.train_on_prompt or not (settings.last_turn_only or mark)
    source_ids: list[int] = []
    source_labels: list[int] = []
    for ids, is_trained in zip(source_pieces, trained[:-1]):
        source_ids += ids
        keep = settings.train_on_prompt or (is_trained and train_earlier)
        source_labels += ids if keep else [IGNORE_INDEX] * len(ids)
    target_ids = list(target) + [t for ids in trailing for t in ids]
    status = "ok"
    if settings.max_source_length is not None and len(source_ids) > settings.max_source_length:
        if settings.skip_overlength:
            return None, "overlength"
        cut = len(source_ids) - settings.max_source_length
        source_ids, source_labels, status = source_ids[cut:], source_labels[cut:], "truncated"
    if settings.max_target_length is not None and len(target_ids) > settings.max_target_length:
        if settings.skip_overlength:
            return None, "overlength"
        target_ids, status = target_ids[: settings.max_target_length], "truncated"
    fixed = len(prefix) + len(mark)
    avail = settings.cutoff_len - fixed
    if len(source_ids) + len(target_ids) > avail:
        if settings.skip_overlength:
            return None, "overlength"
        status = "truncated"
        if len(target_ids) <= avail // 2:
            keep_source = avail - len(target_ids)
        elif len(source_ids) <= avail // 2:
            keep_source = len(source_ids)
        else:
            keep_source = avail // 2
        keep_target = max(avail - keep_source, 0)
        cut = len(source_ids) - keep_source
        source_ids, source_labels = source_ids[cut:], source_labels[cut:]
        target_ids = target_ids[:keep_target]
    input_ids = list(prefix) + source_ids + list(mark) + target_ids
    n_target_answer = min(len(target), len(target_ids))
    target_labels = target_ids[:n_target_answer] + [IGNORE_INDEX] * (len(target_ids) - n_target_answer)
    if settings.train_on_prompt:
        target_labels = list(target_ids)
    labels = ([IGNORE_INDEX] * len(prefix) + source_labels + [IGNORE_INDEX] * len(mark) + target_labels)
    if settings.train_on_prompt and prefix:
        labels[: len(prefix)] = prefix
    if labels.count(IGNORE_INDEX) == len(labels):
        return None, "no_label"
    return {"input_ids": input_ids, "labels": labels}, status


def tokenize_conversation(conv: Conversation | list[dict], tokenizer: Any, template: Any,
                          settings: TokenizeSettings | None = None) -> dict | None:
    """One training example ``{"input_ids", "labels"}`` for the conversation (its last answer, when the
    tokenizer needs one example per answer); None when it is skipped (too long with ``skip_overlength``, or
    nothing left to train)."""
    results = encode_conversation(conv, tokenizer, template, settings or TokenizeSettings())
    return results[-1][0]


# ------------------------------------------------------------------------------------------------------------
# Many conversations: workers, cache
# ------------------------------------------------------------------------------------------------------------

def _tokenize_chunk(args: tuple) -> tuple[list[dict], TokenizeStats]:
    convs, tokenizer, template, settings, layout = args
    return _tokenize_messages([_messages(c) for c in convs], tokenizer, template, settings, layout)


def _tokenize_messages(convs: list[tuple[list[dict], list | None]], tokenizer: Any, template: Any,
                       settings: TokenizeSettings, layout: tuple) -> tuple[list[dict], TokenizeStats]:
    """:func:`_tokenize_chunk` of conversations given as ``(messages, tools)``."""
    plans = _chunk_plans(convs, tokenizer, template, settings, layout)
    return _chunk_examples(len(convs), plans, tokenizer, settings, layout)


def _chunk_plans(convs: list[tuple[list[dict], list | None]], tokenizer: Any, template: Any,
                 settings: TokenizeSettings, layout: tuple) -> list[Plan | None]:
    return [p for messages, tools in convs for p in _plans_of(messages, tools, tokenizer, template, settings,
                                                              layout[1])]


def _chunk_examples(n_convs: int, plans: list[Plan | None], tokenizer: Any, settings: TokenizeSettings,
                    layout: tuple, encoded_texts: list[list[int]] | None = None
                    ) -> tuple[list[dict], TokenizeStats]:
    stats = TokenizeStats(conversations=n_convs)
    examples: list[dict] = []
    for example, status in _examples_from_plans(plans, tokenizer, settings, layout, encoded_texts):
        if status == "overlength":
            stats.skipped_overlength += 1
        elif status == "no_label":
            stats.skipped_no_label += 1
        else:
            stats.truncated += status == "truncated"
            examples.append(example)
            stats.examples += 1
            stats.tokens += len(example["input_ids"])
            stats.trained_tokens += len(example["labels"]) - example["labels"].count(IGNORE_INDEX)
    return examples, stats


class RowBlock(Sequence):
    """Rows ``{"input_ids", "labels"}`` held as two flat C int32 arrays and the end of each row.

    What a worker process sends back: it pickles as two byte strings (a list of Python ints pickles ~5x larger
    and unpickles ~20x slower), and the cache writer writes its arrays as they are.
    """

    def __init__(self, examples: Iterable[dict] = ()):
        self.input_ids, self.labels, self.ends = array("i"), array("i"), []
        for e in examples:
            self.input_ids.extend(e["input_ids"])
            self.labels.extend(e["labels"])
            self.ends.append(len(self.input_ids))

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]
        a, b = (self.ends[i - 1] if i else 0), self.ends[i]
        return {"input_ids": self.input_ids[a:b].tolist(), "labels": self.labels[a:b].tolist()}


_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer: Any, template: Any, settings: TokenizeSettings, layout: tuple) -> None:
    quiet_worker()
    _WORKER["args"] = (tokenizer, template, settings, layout)


def _to_wire(conv: Any) -> tuple:
    """A conversation as plain tuples of (role, text) for a worker process: a Conversation (a dataclass of
    dataclasses) costs ~15x more to unpickle, which was ~10% of two processes' CPU time."""
    messages, tools = _messages(conv)
    if any(len(m) != 2 for m in messages):
        return None, None, conv  # messages with more than a role and a text go as they are
    return tuple((m["role"], m["content"]) for m in messages), tools, None


def _tokenize_in_worker(wired: list) -> tuple[RowBlock, TokenizeStats]:
    convs = [([{"role": r, "content": c} for r, c in pairs], tools) if whole is None else _messages(whole)
             for pairs, tools, whole in wired]
    examples, stats = _tokenize_messages(convs, *_WORKER["args"])
    return RowBlock(examples), stats


def tokenize_chunks(convs: Iterable[Any], tokenizer: Any, template: Any, settings: TokenizeSettings,
                    num_proc: int | None = None, progress: bool = True, total: int | None = None,
                    ) -> Iterator[tuple[list[dict], TokenizeStats]]:
    """(examples, stats) of each chunk of ``convs``, in order, read from the iterable as it goes.

    Memory stays flat in the number of conversations: only a few chunks are in flight (``num_proc * 2`` on
    several processes). ``num_proc=None`` picks: one process for small inputs (``total`` known and small) or
    machines with few cores, else up to 8.
    """
    from tqdm.auto import tqdm

    layout = special_token_layout(tokenizer, template)
    cores = os.cpu_count() or 1
    if num_proc is None:
        big = (total is None or total >= PARALLEL_MIN_CONVERSATIONS) and cores >= PARALLEL_MIN_CORES
        num_proc = min(cores, 8) if big else 1
    size = max(1, min(1000, -(-total // max(num_proc * 4, 1)))) if total is not None else 1000
    chunks = _chunked(convs, size)
    bar = tqdm(total=total, desc="tokenizing", unit="conv", disable=not progress or (total or 10 ** 9) < 200)
    try:
        if num_proc > 1 and (total is None or total > size):
            yield from _chunks_in_workers(chunks, num_proc, (tokenizer, template, settings, layout), bar)
        elif total is None or total > size:
            yield from _chunks_pipelined(chunks, tokenizer, template, settings, layout, bar)
        else:
            for c in chunks:
                result = _tokenize_chunk((c, tokenizer, template, settings, layout))
                bar.update(len(c))
                yield result
    finally:
        bar.close()


def _chunks_pipelined(chunks: Iterator[list], tokenizer: Any, template: Any, settings: TokenizeSettings,
                      layout: tuple, bar: Any) -> Iterator[tuple[list[dict], TokenizeStats]]:
    """One process: the Rust encoding of a chunk runs on a thread (it releases the GIL) while this thread reads
    and renders the next chunk and builds the rows of the one before (~40% of the time is Python)."""
    from concurrent.futures import ThreadPoolExecutor

    def finish(n: int, plans: list, future: Any) -> tuple[list[dict], TokenizeStats]:
        bar.update(n)
        return _chunk_examples(n, plans, tokenizer, settings, layout, future.result())

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="finechat-encode") as pool:
        pending = None
        for c in chunks:
            plans = _chunk_plans([_messages(conv) for conv in c], tokenizer, template, settings, layout)
            submitted = (len(c), plans, pool.submit(_encode_batch, tokenizer, _plan_texts(plans)))
            if pending is not None:
                yield finish(*pending)
            pending = submitted
        if pending is not None:
            yield finish(*pending)


def _chunked(items: Iterable[Any], size: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _chunks_in_workers(chunks: Iterator[list], num_proc: int, worker_args: tuple, bar: Any
                       ) -> Iterator[tuple[list[dict], TokenizeStats]]:
    import multiprocessing as mp
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    # Workers get the tokenizer and template once (inherited on fork, else pickled once per worker),
    # not with every chunk: pickling a tokenizer costs more than tokenizing a chunk.
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
    # Workers encode on one thread each (and the Rust tokenizer does not warn about the fork); the
    # setting is restored afterwards so that this process keeps its multi-threaded encoding.
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        with ProcessPoolExecutor(max_workers=num_proc, mp_context=ctx, initializer=_init_worker,
                                 initargs=worker_args) as pool:
            pending: deque = deque()  # bounded, so that a long stream is never read ahead into memory
            for c in chunks:
                pending.append((pool.submit(_tokenize_in_worker, [_to_wire(conv) for conv in c]), len(c)))
                if len(pending) >= num_proc * 2:
                    future, n = pending.popleft()
                    bar.update(n)
                    yield future.result()
            while pending:
                future, n = pending.popleft()
                bar.update(n)
                yield future.result()
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved


def tokenize_many(convs: Sequence[Any], tokenizer: Any, template: Any, settings: TokenizeSettings,
                  num_proc: int | None = None, progress: bool = True) -> tuple[list[dict], TokenizeStats]:
    """Tokenize in order with a progress bar; large inputs on several processes where cores allow.

    ``num_proc=None`` picks: one process for small inputs or machines with few cores, else up to 8.
    """
    examples: list[dict] = []
    stats = TokenizeStats()
    for ex, st in tokenize_chunks(convs, tokenizer, template, settings, num_proc, progress, total=len(convs)):
        examples += ex
        stats.add(st)
    return examples, stats


# ------------------------------------------------------------------------------------------------------------
# Packing and padding
# ------------------------------------------------------------------------------------------------------------

def pack_examples(examples: Iterable[dict], max_length: int) -> list[dict]:
    """Pack examples, in order, into rows of at most ``max_length`` tokens.

    Each row gets ``position_ids`` restarting at 0 for every example; with no attention mask, transformers
    detects these packed sequences and keeps attention within each example (Llama, Qwen2, GLM ... via
    ``masking_utils.find_packed_sequence_indices``). The first token of each packed example gets label -100
    so that no example is trained to predict the next one's start.
    """
    rows: list[dict] = []
    cur: dict | None = None
    for ex in examples:
        ids, labels = ex["input_ids"], ex["labels"]
        if len(ids) > max_length:  # build_dataset keeps rows within cutoff_len; never cut silently here
            raise DataError(f"an example of {len(ids)} tokens does not fit a packed row of {max_length}; "
                            "tokenize with cutoff_len <= the packing length")
        if cur is None or len(cur["input_ids"]) + len(ids) > max_length:
            cur = {"input_ids": [], "labels": [], "position_ids": [], "seq_lengths": []}
            rows.append(cur)
        cur["input_ids"] += ids
        cur["labels"] += [IGNORE_INDEX] + list(labels[1:])
        cur["position_ids"] += list(range(len(ids)))
        cur["seq_lengths"].append(len(ids))
    return rows


@dataclasses.dataclass
class DataCollator:
    """Pads a batch of examples to its longest row: input_ids with the pad id, labels with -100.

    Packed rows (with ``position_ids``) get no attention mask and ``use_cache=False`` so that the model builds
    per-example masks from the restarting positions; padding there is runs of position 0 that only see
    themselves.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    padding_side: str = "right"

    def __call__(self, batch: list[dict]) -> dict:
        import torch

        longest = max(len(b["input_ids"]) for b in batch)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = -(-longest // m) * m
        packed = all("position_ids" in b for b in batch)

        def pad(seq: list[int], value: int) -> list[int]:
            fill = [value] * (longest - len(seq))
            return fill + list(seq) if self.padding_side == "left" else list(seq) + fill

        out = {
            "input_ids": torch.tensor([pad(b["input_ids"], self.pad_token_id) for b in batch]),  # [batch, seq]
            "labels": torch.tensor([pad(b["labels"], IGNORE_INDEX) for b in batch]),  # [batch, seq]
        }
        if packed:
            out["position_ids"] = torch.tensor([pad(b["position_ids"], 0) for b in batch])  # [batch, seq]
            # transformers only splits packed rows when no KV cache is built (training, use_cache=False).
            out["use_cache"] = False
        else:
            out["attention_mask"] = torch.tensor([pad([1] * len(b["input_ids"]), 0) for b in batch])
        return out


def data_collator(tokenizer: Any, pad_to_multiple_of: int | None = None) -> DataCollator:
    """A collator for ``tokenizer`` (pad id: pad, else EOS, else 0)."""
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return DataCollator(pad_token_id=pad, pad_to_multiple_of=pad_to_multiple_of)

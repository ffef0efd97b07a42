"""Looking at a data file before training on it: token-length statistics and rows with their trained spans.

``finechat data stats`` / ``data preview`` print these; ``finechat board``'s Data tab shows the same numbers and
the same marked rows, so both come from here.
"""

from __future__ import annotations

import json
import sys
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from finechat.data.heap import quiet_collector
from finechat.data.templates import get_template
from finechat.data.tokenize import IGNORE_INDEX, RowBlock, TokenizeSettings, tokenize_chunks
from finechat.errors import ConfigError


def load_tokenizer_and_template(model: str | None, template: str = "auto", trust_remote_code: bool = False
                                ) -> tuple[Any, Any]:
    """The tokenizer of ``model`` ('default' or a folder; nothing is downloaded) and the prompt template."""
    from transformers import AutoTokenizer

    if model in (None, "", "default"):
        # Lazy, as torch is: importing finechat.models registers ChatGLM-6B with transformers (seconds), which
        # convert, licenses, generate and from-kg do not need.
        from finechat.models.resolve import default_model_dir

        folder = default_model_dir()
    else:
        folder = Path(model).expanduser()
    if not Path(folder).is_dir():
        raise ConfigError(f"--model {model}: no such model folder (finechat never downloads models)")
    model_type = None
    cfg = Path(folder) / "config.json"
    if cfg.is_file():
        model_type = json.loads(cfg.read_text(encoding="utf-8")).get("model_type")
    from transformers import CONFIG_MAPPING

    if model_type and model_type not in CONFIG_MAPPING:
        import finechat.models  # noqa: F401  registers finechat's own families (ChatGLM-6B); lazy, see above

    print(f"Loading the tokenizer of {folder} ...", file=sys.stderr, flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--model {model}: cannot load its tokenizer: {e}") from None
    return tokenizer, get_template(template, tokenizer, model_type)


def percentile(sorted_values: Any, q: float) -> int:
    if not len(sorted_values):
        return 0
    k = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return int(sorted_values[k])


def length_stats(convs: Iterable[Any], tokenizer: Any, template: Any, lengths: list[int],
                 num_proc: int | None = None) -> dict[str, Any]:
    """Numbers for ``data stats``: examples, turns and token lengths of the full rows (no truncation).

    ``convs`` (a list or a lazy stream) is read once, chunk by chunk, as it is tokenized; only two int32
    lengths per row are kept, so memory stays flat in the number of records. ``_sizes`` is the sorted row
    lengths (an ``array('i')``).
    """
    import numpy as np

    sizes, trained = array("i"), array("i")
    n = turns = turns_max = multi = tools = 0
    skipped_no_label = 0

    def counted() -> Iterator[Any]:
        nonlocal n, turns, turns_max, multi, tools
        for c in convs:
            n += 1
            turns += len(c.turns)
            turns_max = max(turns_max, len(c.turns))
            multi += sum(t.role == "assistant" for t in c.turns) > 1
            tools += sum(t.role == "tool" for t in c.turns)
            yield c

    with quiet_collector():  # (see finechat.data.heap)
        for examples, st in tokenize_chunks(counted(), tokenizer, template, TokenizeSettings(cutoff_len=10 ** 9),
                                            num_proc=num_proc):
            skipped_no_label += st.skipped_no_label
            if isinstance(examples, RowBlock):  # from a worker process: count on its flat arrays
                block_sizes, block_trained = _block_lengths(examples)
                sizes.frombytes(block_sizes.tobytes())
                trained.frombytes(block_trained.tobytes())
                continue
            for e in examples:
                labels = e["labels"]
                sizes.append(len(e["input_ids"]))
                trained.append(len(labels) - labels.count(IGNORE_INDEX))
    by_size = np.sort(np.frombuffer(sizes, dtype=np.int32)) if sizes else np.zeros(0, dtype=np.int32)
    by_trained = np.sort(np.frombuffer(trained, dtype=np.int32)) if trained else np.zeros(0, dtype=np.int32)
    sorted_sizes = array("i", by_size.tobytes())
    return {
        "conversations": n, "examples": len(by_size), "turns": turns, "turns_max": turns_max, "multi_turn": multi,
        "tool_turns": tools,
        "tokens": {f"p{q}": percentile(by_size, q) for q in (50, 90, 95, 99)}
        | {"max": int(by_size[-1]) if len(by_size) else 0,
           "mean": round(float(by_size.mean()), 1) if len(by_size) else 0.0},
        "trained_tokens": {f"p{q}": percentile(by_trained, q) for q in (50, 90, 99)}
        | {"max": int(by_trained[-1]) if len(by_trained) else 0},
        "over": {k: int(np.count_nonzero(by_size > k)) for k in lengths},
        "skipped_no_label": skipped_no_label,
        "_sizes": sorted_sizes,
    }


def _block_lengths(block: RowBlock) -> tuple[Any, Any]:
    """Each row's length and trained-token count in a RowBlock, as int32 arrays (no Python list per row)."""
    import numpy as np

    ends = np.asarray(block.ends, dtype=np.int64)
    if not len(ends):
        return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int32)
    starts = np.concatenate(([0], ends[:-1]))
    trained = np.concatenate(([0], np.cumsum(np.frombuffer(block.labels, dtype=np.int32) != IGNORE_INDEX)))
    return (ends - starts).astype(np.int32), (trained[ends] - trained[starts]).astype(np.int32)


def marked_spans(tokenizer: Any, input_ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """A row decoded as (text, trained) spans: runs of tokens that carry a label, and runs that do not."""
    spans: list[tuple[str, bool]] = []
    run: list[int] = []
    run_trained = None

    def flush() -> None:
        if run:
            spans.append((tokenizer.decode(run, skip_special_tokens=False), bool(run_trained)))

    for tid, lab in zip(input_ids, labels):
        trained = lab != IGNORE_INDEX
        if trained != run_trained:
            flush()
            run, run_trained = [], trained
        run.append(tid)
    flush()
    return spans


def render_marked(tokenizer: Any, input_ids: list[int], labels: list[int], color: bool) -> str:
    """Decode a row with its trained spans marked (green, or between ⟦ and ⟧)."""
    out = []
    for text, trained in marked_spans(tokenizer, input_ids, labels):
        if trained:
            text = f"\x1b[32m{text}\x1b[0m" if color else f"⟦{text}⟧"
        out.append(text)
    return "".join(out)

"""Work with fine-tuning data: convert formats, show statistics, preview trained spans, licences, samples.

Actions:
  finechat data convert IN --to sharegpt|openai|alpaca OUT
  finechat data stats FILE [--model M] [--png FILE.png] [--force]
  finechat data preview FILE [-n 3] [--model M] [--template T]
  finechat data licenses [--kind dataset|model]
  finechat data generate adgen|arithmetic --n N --seed S --out FILE [--exclude HELDOUT_FILE]
  finechat data generate tools --n N --seed S --out FILE [--layout openai|moss] [--split train|heldout]
  finechat data pairs SFT_FILE --rule auto|numbers|operands|mixed|swap|truncate --out FILE   (pairs by a rule)
  finechat data from-kg GRAPH.json --out FILE --seed N
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from finechat.commands._data_pairs_report import convert_preferences, preference_stats, preview_preferences
from finechat.data.blank_infilling import preview_documents
from finechat.data.catalog import DISCLAIMER, all_entries, registry_table
from finechat.data.formats import (
    FORMATS,
    ReadResult,
    iter_conversations,
    read_conversations,
    write_conversations,
)
from finechat.data.inspection import length_stats, load_tokenizer_and_template, render_marked
from finechat.data.pairs import PREFERENCE_FORMATS, is_preference_file, read_preferences
from finechat.data.preference_generate import RULES as PAIR_RULES
from finechat.data.preference_generate import pairs_main, write_arithmetic
from finechat.data.synthetic import write_adgen
from finechat.data.tokenize import IGNORE_INDEX, TokenizeSettings, encode_conversation
from finechat.data.tool_prompt import where_tools_go
from finechat.errors import ConfigError
from finechat.files import atomic_file, check_output_path, write_jsonl_atomic
from finechat.medical.kg import RELATIONS, KGSettings, from_kg
from finechat.tools.demo_data import LAYOUTS as TOOL_LAYOUTS
from finechat.tools.demo_data import demo_registry, generate_tool_examples, tool_records

DEFAULT_LENGTHS = "128,256,512,1024,2048"
STATS_FOLDER = "output/data-stats"  # the default histogram goes here, not into the current folder
HISTOGRAM_MARK = "finechat data stats"  # the PNG's Software text: a file data stats wrote is replaced freely


def _read_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", default="auto", choices=["auto", *FORMATS, *PREFERENCE_FORMATS],
                   help="input format (default: detect)")
    p.add_argument("--on-bad-record", default="error", choices=["error", "skip"],
                   help="stop at a bad record (default) or skip it and list it")
    p.add_argument("--prompt-column", help="prompt-response: the prompt column (ADGEN: content)")
    p.add_argument("--response-column", help="prompt-response: the response column (ADGEN: summary)")
    p.add_argument("--history-column", help="prompt-response: a column of [[query, response], ...]")


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="model whose tokenizer is used (name or folder)")
    p.add_argument("--template", default="auto", help="prompt template (auto, tokenizer, chatglm, alpaca, ...)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model folder's own code")


def _tokenize_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cutoff-len", type=int, default=1024, help="longest row in tokens")
    p.add_argument("--max-source-length", type=int, help="longest prompt in tokens (ChatGLM ptuning)")
    p.add_argument("--max-target-length", type=int, help="longest answer in tokens (ChatGLM ptuning)")
    p.add_argument("--train-on-prompt", action="store_true", help="train on the prompt too")
    p.add_argument("--last-turn-only", action="store_true", help="train only the last answer")
    p.add_argument("--skip-overlength", action="store_true", help="skip (and count) rows over a limit")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    sub = parser.add_subparsers(dest="action", metavar="ACTION")

    p = sub.add_parser("convert", help="convert a data file to sharegpt, openai or alpaca")
    p.add_argument("input", help="data file (any supported format)")
    p.add_argument("--to", required=True, choices=["sharegpt", "openai", "alpaca", "pref-prompt", "pref-alpaca", "kto"],
                   help="output format (pref-prompt, pref-alpaca, kto: preference data)")
    p.add_argument("output", help="output file (.jsonl: one record a line; .json: one JSON array)")
    _read_options(p)

    p = sub.add_parser("stats", help="examples, turns, token-length percentiles and a histogram PNG")
    p.add_argument("input", nargs="+", help="data file(s)")
    p.add_argument("--lengths", default=DEFAULT_LENGTHS, help="count rows longer than each of these lengths")
    p.add_argument("--png", help=f"histogram file (default: {STATS_FOLDER}/<input stem>_lengths.png; 'none' for no "
                                 "plot)")
    p.add_argument("--force", action="store_true", help="replace an existing file that data stats did not write")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON instead of a table")
    p.add_argument("--num-proc", type=int, help="tokenizing processes (default: picked from the cores)")
    _read_options(p)
    _model_options(p)

    p = sub.add_parser("preview", help="print rendered examples with the trained spans marked")
    p.add_argument("input", help="data file")
    p.add_argument("-n", "--num", type=int, default=3, help="how many examples")
    p.add_argument("--start", type=int, default=0, help="index of the first example")
    p.add_argument("--objective", default="sft", choices=["sft", "blank_infilling"],
                   help="sft (default) or GLM blank infilling")
    p.add_argument("--color", default="auto", choices=["auto", "always", "never"],
                   help="mark trained spans with colour (auto: on a terminal) or with ⟦ ⟧ brackets")
    _read_options(p)
    _model_options(p)
    _tokenize_options(p)

    p = sub.add_parser("licenses", aliases=["licences"], help="known data sets and models with their licences")
    p.add_argument("--kind", choices=["dataset", "model"], help="only data sets or only models")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("generate", help="write synthetic sample data (deterministic by seed)")
    p.add_argument("kind", choices=["adgen", "arithmetic", "tools"],
                   help="adgen: attribute strings -> Chinese advertising copy; arithmetic: small sums with answers; "
                        "tools: tool-use conversations (Calculate, Solve, Search over the shipped demo notes)")
    p.add_argument("--n", type=int, default=1000, help="number of records")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out", required=True, help="output JSONL file")
    p.add_argument("--exclude", action="append", default=[], metavar="FILE",
                   help="arithmetic: never ask a question that a prompt of FILE asks (a held-out set; repeatable)")
    p.add_argument("--layout", choices=list(TOOL_LAYOUTS), default="openai",
                   help="tools: OpenAI messages with tool_calls (the default model's protocol) or MOSS plugin turns")
    p.add_argument("--split", choices=["train", "heldout"], default="train",
                   help="tools: training questions, or held-out ones (look-ups about facts never trained on)")

    p = sub.add_parser("pairs", help="build preference pairs from SFT data by a rule (known right side)")
    p.add_argument("input", help="SFT data file (any supported format)")
    p.add_argument("--rule", default="auto", choices=list(PAIR_RULES),
                   help="how the rejected answer is made from the correct one")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out", required=True, help="output file (.jsonl or .json), pref-prompt format")
    _read_options(p)

    p = sub.add_parser("from-kg", help="build instruction QA data from a medical knowledge graph")
    p.add_argument("graph", help="knowledge graph: JSON array, JSON object with 'records', or JSONL")
    p.add_argument("--out", required=True, help="QA pairs to write (JSONL, Huatuo {instruction, input, output})")
    p.add_argument("--seed", type=int, default=42, help="random seed (same graph + seed = same file)")
    p.add_argument("--phrasings", type=int, default=3, help="question phrasings per (disease, relation) fact")
    p.add_argument("--relations", default=",".join(RELATIONS),
                   help=f"comma-separated relations to ask about (default: all of {', '.join(RELATIONS)})")
    p.add_argument("--holdout", type=float, default=0.0,
                   help="fraction of facts held out as evaluation questions (0 = none)")
    p.add_argument("--holdout-by", choices=("question", "disease"), default="question",
                   help="question: hold out an unseen phrasing of a taught fact; disease: whole diseases")
    p.add_argument("--holdout-out", default=None, help="where held-out questions go (default: OUT.heldout.jsonl)")
    p.add_argument("--table", default=None, help="also write the graph as a disease table CSV (for retrieval)")
    parser.set_defaults(_parser=parser)


def main(args: argparse.Namespace) -> int:
    actions = {"convert": convert, "stats": stats, "preview": preview, "licenses": licenses,
               "licences": licenses, "generate": generate, "from-kg": kg_to_qa, "pairs": pairs}
    if not getattr(args, "action", None):
        args._parser.print_help()
        return 2
    return actions[args.action](args)


# ----------------------------------------------------------------------------------------------------------

def _read(args: argparse.Namespace, paths: Any) -> Any:
    result = read_conversations(paths, format=args.format, on_bad_record=args.on_bad_record,
                                prompt_column=args.prompt_column, response_column=args.response_column,
                                history_column=args.history_column)
    if result.skipped:
        print(result.skipped_table(), file=sys.stderr)
    return result


def convert(args: argparse.Namespace) -> int:
    check_output_path(args.output, args.input)
    if is_preference_file(args.input, args.format):
        return convert_preferences(args)
    result = ReadResult([])
    read = turns = 0

    def counted() -> Iterator[Any]:  # converted as read: memory stays flat in the number of records
        nonlocal read, turns
        for c in iter_conversations(args.input, result, args.format, args.on_bad_record,
                                    prompt_column=args.prompt_column, response_column=args.response_column,
                                    history_column=args.history_column):
            read, turns = read + 1, turns + len(c.turns)
            yield c

    unwritable: list | None = [] if args.on_bad_record == "skip" else None
    n = write_conversations(counted(), args.output, args.to, skipped=unwritable)
    if result.skipped:
        print(result.skipped_table(), file=sys.stderr)
    if unwritable:
        rows = [f"  {f}:{ln}  {field}: {reason}" for f, ln, field, reason in unwritable]
        print("\n".join([f"left out {len(unwritable)} conversation(s) {args.to} cannot hold:"] + rows),
              file=sys.stderr)
    print(f"wrote {n} of {read} conversations ({turns} turns read) as {args.to} to "
          f"{args.output}; read as {result.format}, skipped {len(result.skipped)} bad record(s)"
          + (f", left out {len(unwritable)}" if unwritable else ""))
    return 0


def _tokenizer_and_template(args: argparse.Namespace) -> tuple[Any, Any]:
    return load_tokenizer_and_template(args.model, args.template, args.trust_remote_code)


def _table(rows: list[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def stats(args: argparse.Namespace) -> int:
    try:
        lengths = sorted({int(x) for x in str(args.lengths).split(",") if x.strip()})
    except ValueError:
        raise ConfigError(f"--lengths: expected numbers like {DEFAULT_LENGTHS}, got {args.lengths!r}") from None
    if is_preference_file(args.input[0], args.format):
        print(preference_stats(args.input, args.format, args.on_bad_record, *_tokenizer_and_template(args), lengths,
                               as_json=args.json))
        return 0
    png = args.png or f"{STATS_FOLDER}/{Path(args.input[0]).stem}_lengths.png"
    if png.lower() != "none":
        if Path(png).suffix.lower() != ".png":
            raise ConfigError(f"--png {png}: the histogram is a PNG image; give a file name ending in .png "
                              "(or 'none')")
        check_output_path(png, *args.input, force=args.force or _our_histogram(Path(png)))
    tokenizer, template = _tokenizer_and_template(args)
    result = ReadResult([])
    convs = iter_conversations(args.input, result, args.format, args.on_bad_record, prompt_column=args.prompt_column,
                               response_column=args.response_column, history_column=args.history_column)
    s = length_stats(convs, tokenizer, template, lengths, num_proc=args.num_proc)  # streamed: memory stays flat
    if result.skipped:
        print(result.skipped_table(), file=sys.stderr)
    sizes = s.pop("_sizes")
    s["skipped_records"] = len(result.skipped)
    s["format"] = result.format
    if png.lower() != "none" and sizes:
        _histogram(sizes, lengths, png, title=", ".join(Path(p).name for p in args.input))
        s["histogram"] = png
    if args.json:
        print(json.dumps(s, ensure_ascii=False, indent=2))
        return 0
    n = max(s["examples"], 1)
    rows = [("file", ", ".join(args.input)), ("format", s["format"]),
            ("template", getattr(template, "name", "?")), ("conversations", s["conversations"]),
            ("examples", s["examples"]), ("turns", f"{s['turns']} (max {s['turns_max']} in one conversation)"),
            ("multi-turn conversations", s["multi_turn"]), ("tool turns", s["tool_turns"]),
            ("bad records skipped", s["skipped_records"])]
    rows += [(f"tokens {k}", v) for k, v in s["tokens"].items()]
    rows += [(f"trained tokens {k}", v) for k, v in s["trained_tokens"].items()]
    rows += [(f"rows over {k} tokens", f"{v} ({100 * v / n:.1f}%)") for k, v in s["over"].items()]
    if "histogram" in s:
        rows.append(("histogram", s["histogram"]))
    print(_table(rows))
    return 0


def _our_histogram(path: Path) -> bool:
    """Whether ``path`` is a histogram data stats wrote (its PNG text chunk says so): replaced without --force."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    return head.startswith(b"\x89PNG") and HISTOGRAM_MARK.encode() in head


def _histogram(sizes: list[int], lengths: list[int], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(sizes, bins=min(50, max(5, len(set(sizes)))), color="#4C72B0")
    for n in lengths:
        if n <= max(sizes) * 1.2:
            ax.axvline(n, color="#C44E52", linestyle="--", linewidth=1)
            ax.text(n, ax.get_ylim()[1] * 0.95, f" {n}", color="#C44E52", fontsize=8, va="top")
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("examples")
    ax.set_title(f"token lengths: {title}")
    fig.tight_layout()
    try:
        with atomic_file(path, "wb") as fh:
            fig.savefig(fh, dpi=100, format="png", metadata={"Software": HISTOGRAM_MARK})
    finally:
        plt.close(fig)


def _settings(args: argparse.Namespace) -> Any:
    return TokenizeSettings(cutoff_len=args.cutoff_len, max_source_length=args.max_source_length,
                            max_target_length=args.max_target_length, train_on_prompt=args.train_on_prompt,
                            last_turn_only=args.last_turn_only, skip_overlength=args.skip_overlength)


def preview(args: argparse.Namespace) -> int:
    if args.objective == "blank_infilling":  # plain-text pretraining data, read as `stage: pretrain` reads it
        tokenizer, _ = _tokenizer_and_template(args)
        print(preview_documents(args.input, tokenizer, args.start, args.num))
        return 0
    if is_preference_file(args.input, args.format):
        print(preview_preferences(args.input, args.format, args.on_bad_record, *_tokenizer_and_template(args),
                                  args.start, args.num))
        return 0
    result = _read(args, args.input)
    tokenizer, template = _tokenizer_and_template(args)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    convs = result.conversations[args.start:args.start + args.num]
    settings = _settings(args)
    name = getattr(template, "name", "?")
    print(f"# template: {name}; trained spans {'in green' if color else 'between ⟦ and ⟧'}; "
          f"{len(result.conversations)} conversations in {args.input} ({result.format})")
    for conv in convs:
        for example, status in encode_conversation(conv, tokenizer, template, settings):
            print(f"\n=== {conv.where} ({len(conv.turns)} turns) ===")
            if conv.tools:
                print(f"# tools: {where_tools_go(template, conv.tools)}")
            if example is None:
                print(f"[skipped: {status}]")
                continue
            trained = sum(1 for x in example["labels"] if x != IGNORE_INDEX)
            print(render_marked(tokenizer, example["input_ids"], example["labels"], color))
            note = " (truncated)" if status == "truncated" else ""
            print(f"--- {len(example['input_ids'])} tokens, {trained} trained{note}")
    return 0


def licenses(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps([dataclasses.asdict(e) for e in all_entries() if args.kind in (None, e.kind)],
                         ensure_ascii=False, indent=2))
        return 0
    print(registry_table(args.kind))
    print(f"\n{DISCLAIMER}")
    return 0


def _questions(paths: list[str]) -> set[str]:
    """The last user message of every prompt in data files (SFT or preference data)."""
    found: set[str] = set()
    for path in paths:
        if is_preference_file(path):
            prompts = [p.prompt for p in read_preferences(path).records]
        else:
            prompts = read_conversations(path).conversations
        found |= {next(t.content for t in reversed(c.turns) if t.role == "user") for c in prompts
                  if any(t.role == "user" for t in c.turns)}
    return found


def generate(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise ConfigError(f"--n must be at least 1, got {args.n}")
    check_output_path(args.out)
    if args.kind == "arithmetic":
        held = _questions(args.exclude)
        n = write_arithmetic(args.out, args.n, args.seed, held)
        print(f"wrote {n} arithmetic records (seed {args.seed}"
              + (f", none of the {len(held)} questions of {', '.join(args.exclude)}" if args.exclude else "")
              + f") to {args.out}")
        return 0
    if args.exclude:
        raise ConfigError("--exclude works with arithmetic only")
    if args.kind == "tools":
        registry = demo_registry()
        examples = generate_tool_examples(args.n, seed=args.seed, split=args.split, registry=registry)
        n = write_jsonl_atomic(args.out, tool_records(examples, args.layout, registry))
        print(f"wrote {n} {args.split} tool-use conversations ({args.layout} layout, seed {args.seed}) to {args.out}")
        return 0
    n = write_adgen(args.out, args.n, args.seed)
    print(f"wrote {n} ADGEN-like records (seed {args.seed}) to {args.out}")
    return 0


def kg_to_qa(args: argparse.Namespace) -> int:
    settings = KGSettings(seed=args.seed, phrasings=args.phrasings, relations=args.relations or RELATIONS,
                          holdout=args.holdout or 0.0, holdout_by=args.holdout_by)
    print(from_kg(args.graph, args.out, settings, holdout_out=args.holdout_out, table=args.table))
    return 0


def pairs(args: argparse.Namespace) -> int:
    result = _read(args, args.input)
    print(pairs_main(result.conversations, args.rule, args.seed, args.out))
    return 0

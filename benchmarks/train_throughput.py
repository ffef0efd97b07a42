"""Training throughput: useful (non-padding) tokens per second and peak memory per method, and packing vs padding.

On the default model and the ADGEN-like sample data (data/samples/adgen_train.jsonl), each configuration runs
in its own process (so that peak memory is its own) a few optimizer steps after one warm-up step, with the
same model preparation, tokenization and collator as ``finechat train``:

- LoRA, padded: every example padded to max_seq_length, as ChatGLM-Tuning's collator does (the baseline);
- LoRA, dynamic padding with length-grouped batches (pad to the longest of similar-length examples);
- LoRA, packed: examples packed into max_seq_length rows (positions restart per example, no padding);
- P-Tuning v2, full fine-tuning and QLoRA-4bit, packed.

Prints one table and the ratios to the padded baseline. Usage:
    python benchmarks/train_throughput.py [--steps 3] [--max-seq-length 512] [--model default]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "samples" / "adgen_train.jsonl"

CASES = [
    # name, method, layout, rows per step (batch)
    ("LoRA, padded to max_seq_length", "lora", "padded", 1),
    ("LoRA, length-grouped dynamic padding", "lora", "grouped", 2),
    ("LoRA, packed", "lora", "packed", 1),
    ("P-Tuning v2, packed", "ptuning", "packed", 1),
    ("full, packed", "full", "packed", 1),
    ("QLoRA-4bit, packed", "qlora", "packed", 1),
]


def batches(rows: list[dict], layout: str, batch: int, max_len: int, pad_id: int):
    """Yield (collated batch, useful tokens) forever, in a fixed order."""
    from finechat.data.tokenize import DataCollator, pack_examples

    # ChatGLM-Tuning pads every example to max_seq_length: rows are never longer, so pad to a multiple of it
    collate = DataCollator(pad_token_id=pad_id, pad_to_multiple_of=max_len if layout == "padded" else None)
    if layout == "packed":
        rows = pack_examples(rows, max_len)
    elif layout == "grouped":
        rows = sorted(rows, key=lambda r: len(r["input_ids"]))  # what a length-grouped sampler achieves
    groups = [rows[i:i + batch] for i in range(0, len(rows) - batch + 1, batch)]
    i = 0
    while True:
        group = groups[i % len(groups)]
        i += 1
        useful = sum(len(r["input_ids"]) for r in group)
        collated = collate(group)
        yield collated, useful


def run_case(method: str, layout: str, batch: int, steps: int, max_len: int, model_name: str) -> dict:
    import torch

    from finechat.data.templates import get_template
    from finechat.data.token_cache import build_dataset
    from finechat.data.tokenize import TokenizeSettings
    from finechat.train.methods import count_parameters, prepare_model
    from finechat.train.train_config import TrainConfig
    from finechat.train.trainer_setup import load_base

    torch.manual_seed(0)
    cfg = TrainConfig(model=model_name, method=method, data=[str(DATA)], cutoff_len=max_len, pre_seq_len=32,
                      learning_rate=1e-4, per_device_train_batch_size=batch)
    model, tokenizer, _, _ = load_base(cfg)
    template = get_template(None, tokenizer, model.config.model_type)
    rows, _ = build_dataset([str(DATA)], tokenizer, template, TokenizeSettings(cutoff_len=max_len),
                            progress=False)
    model = prepare_model(model, cfg)
    model.train()
    params, trainable = count_parameters(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate)
    # "padded|packed" alternates the two layouts step by step in one process, so that both see the same
    # machine load (on a shared machine, cases run minutes apart are not comparable)
    layouts = layout.split("|")
    streams = {lay: batches(rows, lay, batch, max_len, tokenizer.pad_token_id or 0) for lay in layouts}
    sums = {lay: [0, 0, 0.0] for lay in layouts}  # useful tokens, all tokens, seconds
    for step in range(steps + 1):
        for lay in layouts:
            data, n_useful = next(streams[lay])
            t0 = time.perf_counter()
            loss = model(**data).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step:  # step 0 warms up allocators and kernels
                sums[lay][0] += n_useful
                sums[lay][1] += data["input_ids"].numel()
                sums[lay][2] += time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    out = {lay: {"useful_tokens_per_s": u / t, "tokens_per_s": n / t, "useful_fraction": u / n,
                 "peak_rss_gib": peak / 1024**3, "trainable": trainable, "params": params, "loss": float(loss)}
           for lay, (u, n, t) in sums.items()}
    return out[layouts[0]] if len(layouts) == 1 else out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps per configuration")
    ap.add_argument("--max-seq-length", type=int, default=512)
    ap.add_argument("--model", default="default")
    ap.add_argument("--only", default="", help="comma-separated case numbers (1-based) to run")
    ap.add_argument("--interleaved", action="store_true",
                    help="only LoRA padded vs packed, alternating steps in one process (robust on a shared machine)")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case and print JSON
    args = ap.parse_args()
    if args.case:
        method, layout, batch = args.case.split(":")
        print(json.dumps(run_case(method, layout, int(batch), args.steps, args.max_seq_length, args.model)))
        return 0
    if args.interleaved:
        res = run_case("lora", "padded|packed", 1, args.steps, args.max_seq_length, args.model)
        pad, pack = res["padded"], res["packed"]
        print("| LoRA, same process, alternating steps | useful tok/s | all tok/s | useful share |")
        print("|---|---|---|---|")
        for name, r in (("padded to max_seq_length", pad), ("packed", pack)):
            print(f"| {name} | {r['useful_tokens_per_s']:.1f} | {r['tokens_per_s']:.1f} | "
                  f"{100 * r['useful_fraction']:.0f}% |")
        print(f"\npacking vs padding (interleaved): {pack['useful_tokens_per_s'] / pad['useful_tokens_per_s']:.2f}x")
        return 0

    wanted = {int(x) for x in args.only.split(",") if x} or set(range(1, len(CASES) + 1))
    results = []
    for i, (name, method, layout, batch) in enumerate(CASES, 1):
        if i not in wanted:
            continue
        print(f"[{i}/{len(CASES)}] {name} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(
            [sys.executable, __file__, "--case", f"{method}:{layout}:{batch}", "--steps", str(args.steps),
             "--max-seq-length", str(args.max_seq_length), "--model", args.model],
            capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        )
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            results.append((name, batch, None))
            continue
        results.append((name, batch, json.loads(proc.stdout.strip().splitlines()[-1])))
        print(f"    {json.dumps(results[-1][2])}", file=sys.stderr, flush=True)

    base = next((r for n, _, r in results if r and n.startswith("LoRA, padded")), None)
    print(f"\nmodel {args.model}, ADGEN-like data ({DATA.name}), max_seq_length {args.max_seq_length}, "
          f"{args.steps} timed steps each, torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}\n")
    print("| configuration | batch | trainable params | useful tok/s | all tok/s | useful share | peak RSS | vs padded |")
    print("|---|---|---|---|---|---|---|---|")
    for name, batch, r in results:
        if r is None:
            print(f"| {name} | {batch} | failed | | | | | |")
            continue
        ratio = f"{r['useful_tokens_per_s'] / base['useful_tokens_per_s']:.2f}x" if base else "-"
        print(f"| {name} | {batch} | {r['trainable'] / 1e6:.2f} M | {r['useful_tokens_per_s']:.1f} | "
              f"{r['tokens_per_s']:.1f} | {100 * r['useful_fraction']:.0f}% | {r['peak_rss_gib']:.2f} GiB | {ratio} |")
    packed = next((r for n, _, r in results if r and n == "LoRA, packed"), None)
    if base and packed:
        ratio = packed["useful_tokens_per_s"] / base["useful_tokens_per_s"]
        print(f"\nLoRA packing vs padding to max_seq_length: {ratio:.2f}x useful tokens/s "
              f"(goal >= 1.5x: {'met' if ratio >= 1.5 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

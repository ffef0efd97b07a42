"""Decode speed, memory and quality per precision: the default model, then a tiny config; prints ratios.

    python benchmarks/decode.py [--threads N] [--new-tokens 48] [--skip-default]

Runs ``finechat bench``'s measurements (finechat.infer.benchmark) side by side with transformers'
``generate`` in the same process. On the default model batch-1 decoding is bound by memory traffic; on the
tiny config (2 layers, hidden 128, the default model's tokenizer) it is bound by the work done per token
outside the matmuls, which is what the fast path removes. Timings on a shared machine are noisy: compare
the ratios, and run it twice.

Goals (issue 8, default model): fast fp32 >= 1.3x generate fp32 with identical greedy tokens; the best
quantized row whose perplexity is within 5% of fp32 >= 2.5x generate fp32; INT8 perplexity within 1%;
INT4 <= 0.65 bytes/param, INT8 <= 1.1.
"""

from __future__ import annotations

import argparse
import sys

import torch

from finechat.infer.benchmark import PRECISIONS, bench_model, format_table
from finechat.models.load import load_model_and_tokenizer, log


def load_default():
    model, tokenizer, _ = load_model_and_tokenizer("default", dtype="float32", device="cpu")
    return model, tokenizer


def load_tiny():
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from finechat.models.load import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval(), tokenizer


def goals(rows) -> list[str]:
    by = {r.precision: r for r in rows}
    fp32 = by["fp32"]
    lines = [f"fp32 fast / generate fp32: {fp32.speedup:.2f}x (goal >= 1.3), greedy identical: {fp32.greedy_identical}"]
    good = [r for r in rows if r.precision.startswith("int") and r.perplexity <= fp32.perplexity * 1.05]
    if good:
        best = max(good, key=lambda r: r.decode_tok_s)
        lines.append(f"best quantized within 5% ppl ({best.precision}): {best.decode_tok_s / fp32.hf_decode_tok_s:.2f}x "
                     "generate fp32 (goal >= 2.5)")
    if "int8" in by:
        lines.append(f"int8 perplexity {(by['int8'].perplexity / fp32.perplexity - 1) * 100:+.2f}% (goal within 1%), "
                     f"{by['int8'].bytes_per_param:.3f} bytes/param (goal <= 1.1)")
    if "int4-g32" in by:
        lines.append(f"int4-g32 {by['int4-g32'].bytes_per_param:.3f} bytes/param, perplexity "
                     f"{(by['int4-g32'].perplexity / fp32.perplexity - 1) * 100:+.2f}%")
    if "int4" in by:
        lines.append(f"int4 {by['int4'].bytes_per_param:.3f} bytes/param (goal <= 0.65), perplexity "
                     f"{(by['int4'].perplexity / fp32.perplexity - 1) * 100:+.2f}%")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--skip-default", action="store_true", help="only the tiny config")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name, loader in (("default model (SmolLM2-135M)", load_default), ("tiny config (2 layers, hidden 128)", load_tiny)):
        if args.skip_default and loader is load_default:
            continue
        rows = bench_model(loader, PRECISIONS + ("int4-g32",), new_tokens=args.new_tokens, log=log)
        print(format_table(rows, title=f"== {name}, CPU threads {args.threads} =="))
        print("\n".join("  " + line for line in goals(rows)))
        print()
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

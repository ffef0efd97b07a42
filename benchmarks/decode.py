"""Decode speed, memory and quality per precision: the default model, then a tiny config; prints ratios.

    python benchmarks/decode.py [--threads N] [--new-tokens 48] [--skip-default]
    python benchmarks/decode.py --llama-1b --device cuda --compile   # the GPU goal, on a lent GPU

``--llama-1b`` benchmarks a Llama-style model of 1.24B parameters with random weights (Llama-3.2-1B's
shape: hidden 2048, 16 layers, 32 heads / 8 KV heads, MLP 8192; the default model's tokenizer) in bf16,
with the fraction of the memory-bandwidth limit on CUDA (bytes read per token / time per token / the
bandwidth of a large device copy measured in the same run). ``--llama-layers 2`` shrinks it for a smoke
test on a CPU.

Runs ``finechat bench``'s measurements (finechat.commands._bench_report) side by side with transformers'
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

from finechat.commands._bench_report import PRECISIONS, bench_model, format_table
from finechat.console import log
from finechat.models.resolve import load_model_and_tokenizer


def load_default():
    model, tokenizer, _ = load_model_and_tokenizer("default", dtype="float32", device="cpu")
    return model, tokenizer


def load_tiny():
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from finechat.models.resolve import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval(), tokenizer


def load_llama_1b(device: str, layers: int):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from finechat.models.resolve import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
                         max_position_embeddings=4096)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.eval(), tokenizer


def gpu_goals(rows) -> list[str]:
    by = {r.precision: r for r in rows}
    row = by.get("bf16")
    if row is None:
        return []
    lines = [f"bf16 fast / generate bf16: {row.speedup:.2f}x (goal >= 1.5), greedy identical: {row.greedy_identical}"]
    if row.bandwidth_fraction is not None:
        lines.append(f"bf16 fraction of the bandwidth limit: {row.bandwidth_fraction * 100:.0f}% (goal >= 70%)")
    return lines


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
    parser.add_argument("--llama-1b", action="store_true", help="only a 1.24B Llama-style model, random weights")
    parser.add_argument("--llama-layers", type=int, default=16, help="its layers (16 = 1.24B; fewer for a smoke test)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where --llama-1b runs")
    parser.add_argument("--compile", action="store_true", help="torch.compile the one-token step")
    parser.add_argument("--rounds", type=int, default=5, help="alternating generate / fast-path runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.llama_1b:
        rows = bench_model(lambda: load_llama_1b(args.device, args.llama_layers), ("bf16",),
                           new_tokens=args.new_tokens, compile=args.compile, rounds=args.rounds, log=log,
                           ppl_tokens=512)
        print(format_table(rows, title=f"== Llama-style, {args.llama_layers} layers, random weights, {args.device} =="))
        print("\n".join("  " + line for line in gpu_goals(rows)))
        return 0
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

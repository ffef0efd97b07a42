"""Quantize a model's weights to INT8 or group-wise INT4 and write a folder every finechat front end loads."""

from __future__ import annotations

import argparse

from finechat.console import log
from finechat.errors import FinechatError
from finechat.models.resolve import load_adapter, load_model_and_tokenizer
from finechat.models.weight_only import (
    DEFAULT_GROUP_SIZE,
    INT4_GROUP_SIZES,
    copy_extra_files,
    quantize_model,
    save_quantized,
    weight_bytes,
)

RUNS_MODEL = True  # runs under models.device.cpu_threads (see finechat.cli)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default", help="'default', a Hugging Face folder or a .gguf file")
    parser.add_argument("--adapter", help="a LoRA adapter folder to merge into the weights before quantizing")
    parser.add_argument("--bits", type=int, choices=[8, 4], required=True, help="8: INT8 per channel; 4: INT4 per group")
    parser.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE, choices=list(INT4_GROUP_SIZES),
                        help="INT4 group size (a layer whose width it does not divide uses the largest one that does)")
    parser.add_argument("--keep-embedding", action="store_true",
                        help="leave the token embedding and output head unquantized (default: INT8)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the layers that stay unquantized (norms, biases) and of the activations")
    parser.add_argument("--out", required=True, metavar="DIR", help="the folder to write")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model folder's own code to run")


def main(args: argparse.Namespace) -> int:
    import shutil
    import time
    from pathlib import Path

    out = Path(args.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise FinechatError(f"{out} exists and is not empty; pass --force to replace it")
    model, tokenizer, folder = load_model_and_tokenizer(args.model, dtype=args.dtype, device="cpu",
                                                        trust_remote_code=args.trust_remote_code)
    if args.adapter:
        model = load_adapter(model, args.adapter)
        if not hasattr(model, "merge_and_unload"):
            raise FinechatError(f"{args.adapter}: only LoRA adapters can be merged before quantizing")
        try:
            model = model.merge_and_unload()
        except (AttributeError, ValueError) as e:
            raise FinechatError(f"{args.adapter}: cannot merge this adapter into the weights ({e}); quantize the "
                                "base model and load the adapter on top instead") from e
    before, params = weight_bytes(model)
    start = time.time()
    log(f"Quantizing to INT{args.bits} ...")
    try:
        quantize_model(model, args.bits, group_size=args.group_size, include_embedding=not args.keep_embedding)
    except ValueError as e:
        raise FinechatError(str(e)) from e
    after, _ = weight_bytes(model)
    record = model.config.finechat_quantization
    if out.exists() and args.force:
        shutil.rmtree(out)
    save_quantized(model, tokenizer, out)
    copy_extra_files(Path(folder), out)
    counts: dict[str, int] = {}
    for spec in record["modules"].values():
        key = f"INT{spec['bits']}" + (f" (group {spec['group_size']})" if spec["bits"] == 4 else "")
        counts[key] = counts.get(key, 0) + 1
    file_mb = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e6
    print(f"Quantized {type(model).__name__} in {time.time() - start:.1f} s -> {out}")
    print(f"  linear layers: {', '.join(f'{n} {k}' for k, n in sorted(counts.items()))}")
    print(f"  embedding/output head: {'INT8' if record['embedding'] else 'unchanged'}")
    print(f"  weights: {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB in memory ({after / params:.3f} bytes/param), "
          f"{file_mb:.1f} MB on disk")
    print(f"Chat with it: finechat chat --model {out}")
    return 0

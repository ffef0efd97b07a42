"""Merge a LoRA adapter into its base model and write a plain Hugging Face folder (optionally 8/4-bit)."""

from __future__ import annotations

import argparse

from finechat.train.export import export_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default", help="the base model: 'default', a folder or a .gguf file")
    parser.add_argument("--adapter", help="the adapter folder to merge (LoRA; P-Tuning is exported beside the base)")
    parser.add_argument("--out", required=True, metavar="DIR", help="the folder to write")
    parser.add_argument("--quantization-bit", type=int, choices=[8, 4],
                        help="quantize the merged weights with bitsandbytes (8-bit LLM.int8 or 4-bit NF4)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="dtype of the written weights (auto: the base folder's own)")
    parser.add_argument("--template", help="prompt template name to record with the export")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output folder")


def main(args: argparse.Namespace) -> int:
    record = export_model(args.model, args.adapter, args.out, quantization_bit=args.quantization_bit,
                          dtype=args.dtype, template=args.template, force=args.force)
    what = "merged model" if record["merged"] else ("base model + adapter" if record["adapter"] else "model")
    print(f"Wrote the {what} to {args.out} ({record['dtype']}"
          f"{', ' + str(record['quantization_bit']) + '-bit' if record['quantization_bit'] else ''}).")
    if record.get("note"):
        print(record["note"])
    print("Load it with plain transformers: AutoModelForCausalLM.from_pretrained("
          f"{str(args.out)!r}), or chat: finechat chat --model {args.out}"
          + (f" --adapter {args.out}/adapter" if record["adapter"] and not record["merged"] else ""))
    return 0

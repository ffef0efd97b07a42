"""Merge a LoRA adapter into its base model and write a Hugging Face folder (optionally 8/4-bit) or a GGUF file.

``--checkpoint CKPT`` turns a sharded training checkpoint (``distributed.strategy`` fsdp2 / zero2 / zero3) into a
plain Hugging Face folder (full / freeze) or peft adapter (LoRA).

``--to gguf`` writes one GGUF file for llama.cpp / Ollama / LM Studio (``--outtype f16|bf16|q8_0|q4_1|...``)
and an Ollama Modelfile beside it.
"""

from __future__ import annotations

import argparse

from finechat.errors import FinechatError
from finechat.models.gguf_writer import OUTTYPES
from finechat.train.export import export_model
from finechat.train.export_llamacpp import export_gguf
from finechat.train.sharded import consolidate

RUNS_MODEL = True  # runs under models.device.cpu_threads (see finechat.cli)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default", help="the base model: 'default', a folder or a .gguf file")
    parser.add_argument("--adapter", help="the adapter folder to merge (LoRA; P-Tuning is exported beside the base)")
    parser.add_argument("--checkpoint", metavar="DIR", help="a sharded training checkpoint (FSDP2 / ZeRO) to write "
                        "out as a plain model folder or peft adapter (no merging)")
    parser.add_argument("--out", required=True, metavar="DIR|FILE.gguf", help="the folder (or, with --to gguf, the "
                                                                               "GGUF file) to write")
    parser.add_argument("--to", default="hf", choices=["hf", "gguf"],
                        help="hf: a Hugging Face folder; gguf: one GGUF file for llama.cpp / Ollama (+ a Modelfile)")
    parser.add_argument("--outtype", choices=list(OUTTYPES),
                        help="GGUF weight type (default f16); q8_0 / q4_x are llama.cpp's block quantizations")
    parser.add_argument("--quantization-bit", type=int, choices=[8, 4],
                        help="quantize the merged weights with bitsandbytes (8-bit LLM.int8 or 4-bit NF4)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="dtype of the written weights (auto: the base folder's own)")
    parser.add_argument("--template", help="prompt template name to record with the export")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output folder")


def main(args: argparse.Namespace) -> int:
    if args.checkpoint:
        if args.adapter or args.to != "hf" or args.quantization_bit or args.outtype:
            raise FinechatError("--checkpoint writes the checkpoint's own model or adapter as it is; export that "
                                "folder again for --adapter merging, --to gguf or --quantization-bit")
        record = consolidate(args.checkpoint, args.out, force=args.force)
        what = "reward model" if record["reward_model"] else "peft adapter" if record["adapter"] else "model"
        print(f"Wrote the {what} of {args.checkpoint} ({record['kind']} shards) to {args.out}.")
        if record["reward_model"]:
            print(f"Score pairs: finechat eval --reward-model {args.out} --data PAIRS")
        else:
            print(f"Chat: finechat chat --adapter {args.out}" if record["adapter"] else
                  f"Chat: finechat chat --model {args.out}")
        return 0
    if args.to == "gguf":
        if args.quantization_bit or args.dtype != "auto" or args.force:
            raise FinechatError("--quantization-bit, --dtype and --force are for --to hf; "
                                "with --to gguf choose the weight type with --outtype")
        return _main_gguf(args)
    if args.outtype:
        raise FinechatError("--outtype is for --to gguf")

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


def _main_gguf(args: argparse.Namespace) -> int:
    record = export_gguf(args.model, args.adapter, args.out, outtype=args.outtype or "f16", template=args.template)
    what = "merged model" if record["merged"] else "model"
    types = ", ".join(f"{n} {k}" for k, n in record["tensor_types"].items())
    print(f"Wrote the {what} to {args.out} ({record['architecture']}, {record['outtype']}: {types} tensors; "
          f"{record['bytes'] / 1e6:.1f} MB; tokenizer {record['tokenizer']}/{record['pre_tokenizer']}, "
          f"{record['tokens']} tokens).")
    print(f"Ollama:    ollama create NAME -f {record['modelfile']} && ollama run NAME")
    print(f"llama.cpp: llama-cli -m {args.out}    finechat: finechat chat --model {args.out} --engine llama.cpp")
    return 0

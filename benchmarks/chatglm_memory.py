"""ChatGLM-6B at full size (random weights): memory, decode speed and the memory-bandwidth limit, FP16 to INT4.

    python benchmarks/chatglm_memory.py --device cpu                       # FP16, BF16, INT8, INT4 (INT4 + INT8: ~6 min here)
    python benchmarks/chatglm_memory.py --device cpu --rows BF16 INT8 INT4  # leave out the slow FP16 row
    python benchmarks/chatglm_memory.py --device cpu --rows INT4 INT4-torch  # finechat's INT4 kernel vs PyTorch's
    python benchmarks/chatglm_memory.py --device cuda                      # GPU memory, as ChatGLM-6B's README
    python benchmarks/chatglm_memory.py --layers 4 --device cpu            # full width, 4 of the 28 blocks
    python benchmarks/chatglm_memory.py --tiny --device cpu                # a smoke run of the same code

Our source (ChatGLM-6B's README) says 13 GB in FP16, 8 GB in INT8 and 6 GB in INT4 for inference. Each row runs
in a process of its own, so that its peak resident memory is its own:

- FP16 / BF16: the model built with random weights in that dtype;
- INT8 / INT4: a folder in the published ``chatglm-6b-int8`` / ``-int4`` layout (one pytorch_model.bin: int8
  weights, fp16 row scales, fp16 embedding) is written first by another process, then loaded the way finechat
  loads such a folder (never the FP16 model; bf16 activations on a CPU). On a CPU, INT4 runs finechat's own
  INT4 x INT8 kernel (finechat.models.int4_kernel) where it builds; INT4-torch is the same folder through
  PyTorch's INT4 kernel (FINECHAT_INT4_KERNEL=torch), the library baseline side by side.

Per row: the peak resident memory (VmHWM) while loading and, reset after loading, while decoding; decode
tokens/s on the fast path (``--tokens`` greedy tokens after a 32-token prompt, the prefill not counted) and in
``generate``; whether the two gave the same greedy tokens; and the fraction of the memory-bandwidth limit:
the limit is the bandwidth this script measures (the best of a few float32 sums over 1 GiB, all threads)
divided by the bytes of weights a decode step reads (every layer and the head; one embedding row).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig

import finechat.models  # noqa: F401  registers ChatGLM with the Auto classes
from finechat.generate.fast import generate_tokens
from finechat.generate.settings import GenerationSettings
from finechat.models import int4_kernel
from finechat.models.chatglm.configuration_chatglm import ChatGLMConfig
from finechat.models.chatglm.modeling_chatglm import ChatGLMForConditionalGeneration
from finechat.models.chatglm.quantization import PackedHead, QuantizedLinear
from finechat.models.chatglm.quantized_checkpoint import load_quantized_chatglm
from finechat.models.decoder_table import fast_decoder

MODES = {"FP16": 0, "BF16": 0, "INT8": 8, "INT4": 4, "INT4-torch": 4}
README_GB = {"FP16": 13, "BF16": 13, "INT8": 8, "INT4": 6, "INT4-torch": 6}
TINY = dict(hidden_size=256, num_layers=2, num_attention_heads=8, vocab_size=1024, mask_token_id=1000,
            gmask_token_id=1001, bos_token_id=1004, eos_token_id=1005)
WEIGHT_STD = 0.02  # transformers' initializer_range, which the FP16 / BF16 rows are built with


def config(args: argparse.Namespace, bits: int = 0):
    sizes = dict(TINY) if args.tiny else {}
    if args.layers:
        sizes["num_layers"] = args.layers
    return ChatGLMConfig(**sizes, quantization_bit=bits)


def memory_bandwidth() -> float:
    """Bytes/s read by a float32 sum over 1 GiB (best of 5, all threads): what a decode step can hope for."""
    data = torch.ones(2**28, dtype=torch.float32)
    data.sum()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best


def status_kib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    return float("nan")


def reset_peak_rss() -> bool:
    """Restart VmHWM from the current resident size (Linux: 5 > /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------------------
# the published INT8 / INT4 layout, written with random weights
def write_quantized_folder(args: argparse.Namespace, bits: int, folder: Path) -> None:
    """config.json + one pytorch_model.bin as chatglm-6b-int4 / -int8 lay them out, never holding float layers."""
    cfg = config(args, bits)
    with torch.device("meta"):
        shapes = {k: (v.shape, v.dtype) for k, v in ChatGLMForConditionalGeneration(cfg).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    # uniform codes: std 73.6 (INT8, -127..127) or 4.6 (INT4, -8..7) steps, scaled to the float rows' std
    code_std = 73.6 if bits == 8 else 4.6
    state = {}
    for name, (shape, dtype) in shapes.items():
        if name == "lm_head.weight":
            continue  # tied to the embedding, not stored
        if dtype == torch.int8:
            low, high = (-127, 128) if bits == 8 else (-128, 128)  # INT4: any byte is two valid nibbles
            state[name] = torch.randint(low, high, shape, dtype=torch.int8, generator=generator)
        elif name.endswith("weight_scale"):
            state[name] = torch.full(shape, WEIGHT_STD / code_std, dtype=torch.float16)
        elif "layernorm" in name:
            state[name] = torch.ones(shape, dtype=torch.float16) if name.endswith("weight") \
                else torch.zeros(shape, dtype=torch.float16)
        elif name.endswith("bias"):
            state[name] = torch.zeros(shape, dtype=torch.float16)
        else:  # the embedding, filled a block of rows at a time to keep the float32 temporaries small
            table = torch.empty(shape, dtype=torch.float16)
            for i in range(0, shape[0], 8192):
                table[i:i + 8192] = torch.randn(table[i:i + 8192].shape, generator=generator) * WEIGHT_STD
            state[name] = table
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "pytorch_model.bin")
    cfg.save_pretrained(folder)


# --------------------------------------------------------------------------------------------------------
# one row
def streamed_bytes(model) -> int:
    """Bytes of weights one decode step reads: every module's tensors but the embedding table (one row of it)."""
    seen: set[int] = set()
    total = 0
    embedding = model.transformer.word_embeddings
    for module in model.modules():
        if module is embedding:
            continue
        tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if isinstance(module, PackedHead) and module.weight.device.type == "cpu" and "_int8_copy" in module.__dict__:
            tensors = list(module.int8_copy())  # the INT8 copy is what the CPU head reads
        for t in tensors:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def build_float(args: argparse.Namespace, dtype: torch.dtype):
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built directly in this dtype: no float32 copy of 6.2B parameters
    try:
        with torch.device(args.device):
            return ChatGLMForConditionalGeneration(config(args)).eval()
    finally:
        torch.set_default_dtype(previous)


def run_row(args: argparse.Namespace, mode: str) -> dict:
    cuda = args.device == "cuda"
    start = time.perf_counter()
    if MODES[mode]:
        model = load_quantized_chatglm(args.folder, AutoConfig.from_pretrained(args.folder), None,
                                       torch.bfloat16 if not cuda else torch.float16).to(args.device)
    else:
        model = build_float(args, torch.float16 if mode == "FP16" else torch.bfloat16)
    load_seconds = time.perf_counter() - start
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values()) \
        - model.lm_head.weight.numel() * model.lm_head.weight.element_size()  # tied: counted once
    load_peak = status_kib("VmHWM") * 1024
    decode_peak_is_own = reset_peak_rss()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    cfg = model.config
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(10, min(cfg.vocab_size, 20000), (30,), generator=generator).tolist()
    prompt += [cfg.gmask_token_id, cfg.bos_token_id]
    decoder = fast_decoder(model)
    list(generate_tokens(decoder, prompt, GenerationSettings(greedy=True, max_new_tokens=2)))  # warm-up: INT4
    times, tokens = [], []  # repacks, the head makes its INT8 copy
    for token in generate_tokens(decoder, prompt, GenerationSettings(greedy=True, max_new_tokens=args.tokens)):
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter())
        tokens.append(token)
    fast_rate = (len(times) - 1) / (times[-1] - times[0])
    ids = torch.tensor([prompt], device=args.device)

    def generate(n: int) -> tuple[list[int], float]:
        begin = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                                 pad_token_id=cfg.pad_token_id)
        return out[0, len(prompt):].tolist(), time.perf_counter() - begin

    _, one = generate(1)
    expected, full = generate(args.tokens)
    row = {
        "mode": mode, "load_s": load_seconds, "weights": weights, "streamed": streamed_bytes(model),
        "peak_load": load_peak, "peak_decode": status_kib("VmHWM") * 1024 if decode_peak_is_own else float("nan"),
        "fast_tok_s": fast_rate, "generate_tok_s": (args.tokens - 1) / max(full - one, 1e-9),
        "same_tokens": tokens == expected, "tokens": tokens,
        "layouts": sorted({m.layout for m in model.modules() if isinstance(m, QuantizedLinear)}),
    }
    if cuda:
        row["peak_decode"] = torch.cuda.max_memory_allocated()
    return row


# --------------------------------------------------------------------------------------------------------
def child(args: argparse.Namespace, *extra: str) -> list[str]:
    command = [sys.executable, __file__, "--device", args.device, "--tokens", str(args.tokens), *extra]
    return command + (["--tiny"] if args.tiny else []) + (["--layers", str(args.layers)] if args.layers else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--rows", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--tiny", action="store_true", help="2 layers, hidden 256 (a smoke run of the script)")
    parser.add_argument("--layers", type=int, help="fewer blocks than the model's 28 (a quicker run at full width)")
    parser.add_argument("--row", choices=list(MODES), help=argparse.SUPPRESS)  # internal: run one row, print JSON
    parser.add_argument("--write", type=int, choices=[4, 8], help=argparse.SUPPRESS)  # internal: write a folder
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; use --device cpu")
    if args.write:
        write_quantized_folder(args, args.write, args.folder)
        return
    if args.row:
        print("ROW " + json.dumps(run_row(args, args.row)))
        return

    bandwidth = memory_bandwidth()
    load = os.getloadavg()[0]
    gib = 2**30
    where = "a CUDA GPU (memory: allocated by torch)" if args.device == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads, load average {load:.1f} at the start"
    size = "(tiny) " if args.tiny else f"({args.layers} of 28 blocks) " if args.layers else ""
    print(f"ChatGLM-6B {size}random weights on {where}; {args.tokens} greedy tokens after a 32-token prompt; "
          f"measured read bandwidth {bandwidth / 1e9:.1f} GB/s")
    peak = "peak GPU memory decoding GiB" if args.device == "cuda" else "peak RSS loading / decoding GiB"
    print(f"| mode | weights GiB | read per token GiB | {peak} | README says GB | decode tok/s (fast path) | "
          "bandwidth limit tok/s | of the limit | generate tok/s | same greedy tokens as generate |")
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory(prefix="chatglm-bench-") as tmp:
        for mode in args.rows:  # each row in a process of its own: its peak memory is its own
            extra = ["--row", mode]
            if MODES[mode]:
                folder = Path(tmp) / f"chatglm-6b-{mode.lower()}"
                subprocess.run(child(args, "--write", str(MODES[mode]), "--folder", str(folder)), check=True)
                extra += ["--folder", str(folder)]
            env = dict(os.environ, **({int4_kernel.ENV: "torch"} if mode == "INT4-torch" else {}))
            out = subprocess.run(child(args, *extra), check=True, stdout=subprocess.PIPE, text=True, env=env).stdout
            r = json.loads(next(line for line in out.splitlines() if line.startswith("ROW "))[4:])
            if MODES[mode]:
                (folder / "pytorch_model.bin").unlink()
            limit = bandwidth / r["streamed"]
            memory = f"{r['peak_decode'] / gib:.2f}" if args.device == "cuda" else \
                f"{r['peak_load'] / gib:.2f} / {r['peak_decode'] / gib:.2f}"
            kernel = {"int4_blocks": " (finechat kernel)", "cpu_int4pack": " (PyTorch kernel)"}.get(
                ",".join(r["layouts"]), "") if MODES[mode] == 4 else ""
            print(f"| {r['mode'].split('-')[0]}{kernel} | {r['weights'] / gib:.2f} | {r['streamed'] / gib:.2f} | {memory} | "
                  f"{README_GB[r['mode']]} | {r['fast_tok_s']:.2f} | {limit:.1f} | {r['fast_tok_s'] / limit:.0%} | "
                  f"{r['generate_tok_s']:.2f} | {'yes' if r['same_tokens'] else 'NO'} |", flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

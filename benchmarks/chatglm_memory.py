"""ChatGLM-6B at full size (random weights): GPU memory and decode speed in FP16, INT8 and INT4.

    python benchmarks/chatglm_memory.py                 # 28 layers, hidden 4096, on CUDA
    python benchmarks/chatglm_memory.py --tiny --device cpu   # a 2-layer smoke run of the same code

Our source (ChatGLM-6B's README) says 13 GB in FP16, 8 GB in INT8 and 6 GB in INT4 for inference. Each
row builds the model in fp16 on the device, quantizes it in place with ChatGLM's format
(``model.quantize(bits)``), then reports the weights' memory, the peak while decoding ``--tokens`` greedy
tokens after a 32-token prompt, and decode tokens/s (one table, FP16 as the reference row).
"""

from __future__ import annotations

import argparse
import gc
import time

import torch


def run(bits: int, args: argparse.Namespace) -> dict:
    from finechat.models.chatglm.configuration_chatglm import ChatGLMConfig
    from finechat.models.chatglm.modeling_chatglm import ChatGLMForConditionalGeneration

    sizes = dict(hidden_size=256, num_layers=2, num_attention_heads=8, vocab_size=1024, mask_token_id=1000,
                 gmask_token_id=1001, bos_token_id=1004, eos_token_id=1005) if args.tiny else {}
    config = ChatGLMConfig(**sizes)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)  # build directly in fp16: no fp32 copy of 6.2B parameters
    try:
        with torch.device(args.device):
            model = ChatGLMForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    if bits:
        model.quantize(bits)
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        weights = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    else:
        weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    prompt = torch.randint(10, 1000, (1, 30), device=args.device)
    ids = torch.cat([prompt, torch.tensor([[config.gmask_token_id, config.bos_token_id]], device=args.device)], 1)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4)  # warm-up
        if cuda:
            torch.cuda.synchronize()
        t0 = time.time()
        out = model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
        if cuda:
            torch.cuda.synchronize()
    seconds = time.time() - t0
    new = out.shape[1] - ids.shape[1]
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    del model
    gc.collect()
    return {"mode": {0: "FP16", 8: "INT8", 4: "INT4"}[bits], "weights_gib": weights, "peak_gib": peak,
            "tokens_per_s": new / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--tiny", action="store_true", help="2 layers, hidden 256 (a smoke run of the script)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; use --tiny --device cpu for a smoke run")
    rows = [run(bits, args) for bits in (0, 8, 4)]
    source = {"FP16": 13, "INT8": 8, "INT4": 6}
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"ChatGLM-6B {'(tiny) ' if args.tiny else ''}random weights on {name}; {args.tokens} greedy tokens")
    print("| mode | weights GiB | peak while decoding GiB | README says GB | decode tok/s | speed vs FP16 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['weights_gib']:.2f} | {r['peak_gib']:.2f} | {source[r['mode']]} | "
              f"{r['tokens_per_s']:.1f} | {r['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}x |")


if __name__ == "__main__":
    main()

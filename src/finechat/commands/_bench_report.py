"""Measure memory, speed and quality of a model per precision (fp32, bf16, int8, int4): ``finechat bench``.

One row per precision, all measured in the same process, one model resident at a time:

* weight bytes (every parameter and buffer in memory, tied tensors once) and bytes per parameter;
* peak RSS while that row runs perplexity, prefill and a first decode (Linux: ``VmHWM``, reset per row
  through ``/proc/self/clear_refs``), or peak GPU memory on CUDA;
* prefill tokens/s (a prompt from the held-out text) and decode tokens/s at batch 1 with the fast path,
  where available, and with transformers' ``generate`` on the same model -- both from the median time
  between consecutive tokens, which a busy shared machine disturbs far less than a total;
* perplexity on the held-out text bundled with finechat (``finechat/data/resources/heldout.txt``, Chinese
  and English, written for this project) and top-1 agreement with the fp32 model on the same positions;
* whether the fast path's greedy tokens equal ``generate``'s for that model.

``generate`` always runs on transformers' own modules, so the baseline column is what a user of
transformers alone gets; on CPU the fast decoder runs fp32 Linear layers as row-split products (see
``finechat.models.row_split``). The two are timed in alternating rounds (the split undone before each
``generate`` round and redone before each fast one), and each speed is the median over the rounds, so
that a slow spell of a shared machine hits both.

On CUDA it adds the fraction of the memory-bandwidth limit: (weight bytes read per token / time per
token) / the bandwidth of a device-to-device copy measured in the same run.
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import gc
import statistics
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from finechat.generate.fast import generate_tokens
from finechat.generate.settings import GenerationSettings
from finechat.models.decoder_table import fast_decoder, is_supported
from finechat.models.row_split import split_linear_layers, unsplit_linear_layers
from finechat.models.weight_only import DEFAULT_GROUP_SIZE, quantize_model, weight_bytes

PRECISIONS = ("fp32", "bf16", "int8", "int4")


def heldout_text() -> str:
    """The bundled held-out text (Chinese and English) used for perplexity."""
    return resources.files("finechat.data").joinpath("resources/heldout.txt").read_text(encoding="utf-8")


# -- memory -------------------------------------------------------------------------------------------
def _release_memory() -> None:
    gc.collect()
    try:  # hand freed heap back to the OS so that the next row's peak starts low (glibc keeps large blocks)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def copy_bandwidth_gbs(device: torch.device, megabytes: int = 512) -> float:
    """Device memory bandwidth from a large copy (read + write), in GB/s."""
    n = megabytes * 2**20 // 4
    a = torch.empty(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        b.copy_(a)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * 5 * a.numel() * 4 / (time.perf_counter() - start) / 1e9


# -- measurements ---------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def perplexity_and_top1(model: Any, ids: torch.Tensor, window: int = 512) -> tuple[float, torch.Tensor]:
    """Perplexity of ``ids`` [n] in non-overlapping windows, and the top-1 prediction at every position."""
    device = next(p for p in model.parameters()).device
    total_nll, count, top1 = 0.0, 0, []
    for start in range(0, ids.numel() - 1, window):
        chunk = ids[start:start + window + 1].to(device)
        if chunk.numel() < 2:
            break
        logits = model(chunk[None, :-1]).logits[0].float()  # [len, vocab]
        total_nll += torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum").item()
        count += chunk.numel() - 1
        top1.append(logits.argmax(-1).cpu())
    return float(torch.exp(torch.tensor(total_nll / count))), torch.cat(top1)


def time_hf_generate(model: Any, prompt: list[int], new_tokens: int) -> tuple[list[int], float]:
    """Greedy ``generate`` at batch 1; returns (tokens, median seconds between tokens)."""
    from transformers.generation.streamers import BaseStreamer

    device = next(model.parameters()).device
    stamps: list[float] = []

    class Clock(BaseStreamer):
        def put(self, value):  # noqa: ANN001
            _sync(device)
            stamps.append(time.perf_counter())

        def end(self):
            pass

    ids = torch.tensor([prompt], device=device)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                             pad_token_id=0, eos_token_id=None, streamer=Clock())  # no stop, as the fast path here
    gaps = [b - a for a, b in zip(stamps[2:], stamps[3:])]  # skip the prompt and the prefill
    return out[0, len(prompt):].tolist(), statistics.median(gaps)


def _greedy(new_tokens: int) -> GenerationSettings:
    """Greedy, no stop token: as the ``generate`` rounds run."""
    return GenerationSettings(greedy=True, max_new_tokens=new_tokens)


def time_fast_decode(decoder: Any, prompt: list[int], new_tokens: int) -> tuple[list[int], float]:
    """Greedy decoding with the fast path; returns (tokens, median seconds between tokens)."""
    tokens, stamps = [], []
    for token in generate_tokens(decoder, prompt, _greedy(new_tokens)):
        _sync(decoder.device)
        stamps.append(time.perf_counter())
        tokens.append(token)
    gaps = [b - a for a, b in zip(stamps[1:], stamps[2:])]
    return tokens, statistics.median(gaps)


def time_prefill(model: Any, decoder: Any, prompt: list[int], repeats: int = 3) -> float:
    """Prompt tokens per second (median of ``repeats``), through the fast path when there is one."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        if decoder is not None:
            decoder.setup_cache(1, len(prompt) + 1)
            decoder.prefill(ids)
        else:
            with torch.inference_mode():
                model(ids, logits_to_keep=1)
        _sync(device)
        times.append(time.perf_counter() - start)
    return len(prompt) / statistics.median(times)


@dataclasses.dataclass
class BenchRow:
    precision: str
    weight_bytes: int
    bytes_per_param: float
    peak_memory_mb: float | None
    prefill_tok_s: float
    decode_tok_s: float
    hf_decode_tok_s: float
    perplexity: float
    top1_agreement: float
    greedy_identical: bool | None
    fast_path: bool
    bandwidth_fraction: float | None = None
    engine: str = "torch"
    bare_decode_tok_s: float | None = None  # llama.cpp rows: bare llama-cpp-python on the same file

    @property
    def speedup(self) -> float:
        return self.decode_tok_s / self.hf_decode_tok_s


def make_precision(model: Any, precision: str, group_size: int) -> Any:
    """A copy of the fp32 ``model`` in ``precision`` (quantized ones keep the embedding/head in INT8)."""
    if precision == "fp32":
        return model
    clone = copy.deepcopy(model)
    if precision == "bf16":
        return clone.to(torch.bfloat16)
    if precision == "fp16":
        return clone.to(torch.float16)
    bits, group = parse_precision(precision, group_size)
    return quantize_model(clone, bits, group_size=group, include_embedding=True)


def parse_precision(precision: str, group_size: int) -> tuple[int, int]:
    """'int8' -> (8, g), 'int4' -> (4, group_size), 'int4-g32' -> (4, 32)."""
    name, _, group = precision.partition("-g")
    bits = {"int8": 8, "int4": 4}.get(name)
    if bits is None or (group and not group.isdigit()):
        raise ValueError(f"unknown precision {precision!r}; valid: fp32, bf16, fp16, int8, int4, int4-g<group size>")
    return bits, int(group) if group else group_size


def bench_model(load_fp32: Any, precisions: tuple[str, ...] = PRECISIONS, new_tokens: int = 48,
                prompt_tokens: int = 128, group_size: int | None = None, compile: bool = False,
                ppl_tokens: int | None = None, log: Any = print, rounds: int = 5,
                references: dict | None = None) -> list[BenchRow]:
    """Benchmark every precision; ``load_fp32()`` returns a fresh (model, tokenizer) in fp32.

    Decode speeds are the median over ``rounds`` alternating runs of ``generate`` and the fast path.
    ``references``, when given, receives the held-out ids, the prompt and the fp32 row's top-1 predictions and
    greedy tokens, for rows measured elsewhere (``finechat.commands._bench_llamacpp``).
    """
    group_size = group_size or DEFAULT_GROUP_SIZE
    rows: list[BenchRow] = []
    reference_top1: torch.Tensor | None = None
    text_ids: torch.Tensor | None = None
    bandwidth = None
    for precision in precisions:
        _release_memory()
        base, tokenizer = load_fp32()
        device = next(base.parameters()).device
        if text_ids is None:
            text_ids = torch.tensor(tokenizer(heldout_text())["input_ids"])[:ppl_tokens]
            if device.type == "cuda":
                bandwidth = copy_bandwidth_gbs(device)
                log(f"device copy bandwidth: {bandwidth:.0f} GB/s")
        prompt = text_ids[:prompt_tokens].tolist()
        model = make_precision(base, precision, group_size).eval()
        del base
        fast = is_supported(model)
        decoder = fast_decoder(model, compile=compile) if fast else None  # splits fp32 Linear layers on CPU
        _release_memory()
        reset_peak_memory(device)
        log(f"[{precision}] perplexity on {text_ids.numel()} held-out tokens ...")
        ppl, top1 = perplexity_and_top1(model, text_ids)
        if reference_top1 is None:
            reference_top1 = top1
        agreement = float((top1 == reference_top1).float().mean())
        log(f"[{precision}] prefill and decode ({new_tokens} tokens, fast path: {'yes' if fast else 'no'}) ...")
        if decoder is not None:
            list(generate_tokens(decoder, prompt, _greedy(3)))  # warm-up (and compilation)
        prefill = time_prefill(model, decoder, prompt)
        peak = peak_memory_mb(device)
        time_hf_generate(model, prompt, 3)  # warm-up
        hf_gaps, fast_gaps, hf_tokens, fast_tokens = [], [], None, None
        for _ in range(rounds):
            unsplit_linear_layers(model)  # generate on transformers' own modules
            hf_tokens, gap = time_hf_generate(model, prompt, new_tokens)
            hf_gaps.append(gap)
            if decoder is not None:
                if decoder.split_rows:
                    split_linear_layers(model)
                fast_tokens, gap = time_fast_decode(decoder, prompt, new_tokens)
                fast_gaps.append(gap)
        hf_gap = statistics.median(hf_gaps)
        if decoder is not None:
            fast_gap, identical = statistics.median(fast_gaps), fast_tokens == hf_tokens
        else:
            fast_gap, identical = hf_gap, None
        if precision == "fp32" and references is not None:
            references.update(text_ids=text_ids, prompt=prompt, top1=top1, hf_tokens=hf_tokens)
        total_bytes, params = weight_bytes(model)
        fraction = total_bytes / fast_gap / (bandwidth * 1e9) if bandwidth else None
        rows.append(BenchRow(precision, total_bytes, total_bytes / params, peak, prefill, 1 / fast_gap, 1 / hf_gap,
                             ppl, agreement, identical, fast, fraction))
        del model, decoder
    return rows


def format_table(rows: list[BenchRow], title: str = "") -> str:
    """The bench rows as one aligned text table (and the ratios the goals are stated in)."""
    fp32 = next((r for r in rows if r.precision == "fp32"), None)
    show_bw = any(r.bandwidth_fraction is not None for r in rows)
    show_cpp = any(r.engine == "llama.cpp" for r in rows)
    header = ["precision", "weights MB", "bytes/param", "peak MB", "prefill tok/s", "decode tok/s",
              "HF generate tok/s", "x HF", "x HF fp32", "ppl", "ppl vs fp32", "top-1 agree", "greedy = HF"]
    if show_cpp:
        header += ["x fast fp32", "bare llama.cpp tok/s", "x bare"]
    if show_bw:
        header.append("of BW limit")
    table = [header]
    for r in rows:
        cpp = r.engine == "llama.cpp"
        line = [r.precision, f"{r.weight_bytes / 1e6:.1f}", f"{r.bytes_per_param:.3f}",
                "-" if r.peak_memory_mb is None else f"{r.peak_memory_mb:.0f}", f"{r.prefill_tok_s:.1f}",
                f"{r.decode_tok_s:.1f}", "-" if cpp else f"{r.hf_decode_tok_s:.1f}", "-" if cpp else f"{r.speedup:.2f}",
                f"{r.decode_tok_s / fp32.hf_decode_tok_s:.2f}" if fp32 else "-", f"{r.perplexity:.3f}",
                f"{(r.perplexity / fp32.perplexity - 1) * 100:+.2f}%" if fp32 else "-", f"{r.top1_agreement:.3f}",
                {True: "yes", False: "NO", None: "n/a"}[r.greedy_identical]]
        if show_cpp:
            line += [f"{r.decode_tok_s / fp32.decode_tok_s:.2f}" if fp32 else "-",
                     f"{r.bare_decode_tok_s:.1f}" if cpp else "-",
                     f"{r.decode_tok_s / r.bare_decode_tok_s:.3f}" if cpp else "-"]
        if show_bw:
            line.append("-" if r.bandwidth_fraction is None else f"{r.bandwidth_fraction * 100:.0f}%")
        table.append(line)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = [title] if title else []
    for i, row in enumerate(table):
        lines.append("  ".join(cell.rjust(w) if j else cell.ljust(w) for j, (cell, w) in enumerate(zip(row, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("decode tok/s: fast path at batch 1 (median gap between tokens); x HF: vs generate on the same "
                 "model; x HF fp32: vs generate in fp32; int8/int4 keep the embedding and tied head in INT8.")
    if show_cpp:
        lines.append("llama.cpp rows: the model exported to GGUF, run by finechat's --engine llama.cpp (decode tok/s, "
                     "through stream_text) and by bare llama-cpp-python on the same file (x bare = the wrapper's "
                     "cost); x fast fp32: vs finechat's fast path in fp32; greedy = HF: vs generate in fp32.")
    return "\n".join(lines)

"""vLLM vs finechat's own batching server vs llama.cpp: output tokens/s and time to first token, 1 and 16 clients.

    python benchmarks/vllm.py                               # the default model on a CPU, 1 and 16 clients
    python benchmarks/vllm.py --device cuda --dtype bfloat16 --clients 1,16,64   # the same script on a GPU
    finechat export --to gguf --model default --outtype f32 --out default-f32.gguf
    python benchmarks/vllm.py --gguf default,default-f32.gguf  # llama.cpp on the shipped Q4_1 and on float32 weights

Each engine runs behind ``finechat serve`` in a subprocess on 127.0.0.1 (``--engine torch``: finechat's batching
engine; ``--engine vllm``: vLLM's server as finechat's child, spoken to over HTTP; ``--engine llama.cpp``: each
GGUF of ``--gguf``, by default the default model's shipped Q4_1 file, through llama-cpp-python, skipped with the
reason shown where it is not installed), and the
bare vLLM server that finechat started is measured too (its own ``/v1/chat/completions``), so the cost of
finechat's front is its own row. N concurrent clients stream ``/v1/chat/completions`` (greedy, ``max_tokens``
each; every client sends its next request when its answer ends). Prints one table: engine, clients, output
tokens/s, time to first token p50 / p99, ms per token p50, and tokens/s against finechat's engine at the same
number of clients. The CPU (model name and flags) is printed beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import drive, free_port, wait_for_server  # noqa: E402

ENGINES = ("torch", "vllm", "llama.cpp")


def cpu_name() -> str:
    """The CPU's model name, core count and SIMD flags that matter for these kernels."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{os.cpu_count()} CPUs"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    simd = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    return f"{name}, {len(os.sched_getaffinity(0))} cores, {' '.join(simd) or 'no AVX2'}"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (the CPU is often shared: say how busy it was)."""
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


class Served:
    """``finechat serve --engine ENGINE`` in a subprocess; for vLLM also the URL of the child it started."""

    def __init__(self, args: argparse.Namespace, engine: str, levels: list[int], model: str):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "finechat", "serve", "--model", model, "--port", str(self.port),
                   "--engine", engine, "--max-batch-size", str(max(levels)), "--model-name", "default",
                   "--max-queue", str(max(levels) * 4)]
        if engine != "llama.cpp":
            command += ["--dtype", args.dtype, "--device", args.device]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self.child_url: str | None = None
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line.rstrip())
            found = re.search(r"Starting vLLM on (http://127\.0\.0\.1:\d+)", line)
            if found:
                self.child_url = found.group(1)

    def wait(self, timeout: float) -> None:
        try:
            wait_for_server(self.base, self.process, timeout=timeout)
        except SystemExit as e:
            tail = "\n".join(self.lines[-5:])
            raise SystemExit(f"{e}\n{tail}") from None

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def llama_cpp_missing() -> str | None:
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (make llamacpp)"
    return None


def gguf_label(path: str) -> str:
    """The weight type of a GGUF file for the table ("Q4_1", "F32"), read from its header with the gguf package."""
    from gguf import GGUFReader

    from finechat.models.resolve import default_gguf_path

    file = default_gguf_path() if path == "default" else Path(path)
    try:
        field = GGUFReader(str(file)).fields.get("general.file_type")
        import gguf

        return gguf.LlamaFileType(int(field.parts[field.data[0]][0])).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except Exception:  # noqa: BLE001  the label only: the file name does
        return file.name


def measure(base: str, model: str, levels: list[int], args: argparse.Namespace, label: str) -> list[dict]:
    asyncio.run(drive(base, 1, 1, 8, model=model))  # warm up
    rows = []
    for clients in levels:
        print(f"{label}: {clients} client(s) ...", file=sys.stderr, flush=True)
        row = asyncio.run(drive(base, clients, max(clients, args.requests), args.max_tokens, model=model))
        rows.append({**row, "engine": label})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="'default' or a Hugging Face folder")
    parser.add_argument("--clients", default="1,16", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--requests", type=int, default=16, help="requests per level (at least one per client)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--engines", default=",".join(ENGINES), help="which of torch, vllm, llama.cpp to run")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (torch and vllm)")
    parser.add_argument("--dtype", default="auto", help="auto (float32 on a CPU, bfloat16 / the model's on CUDA), "
                                                         "float32, bfloat16, float16")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the servers")
    parser.add_argument("--gguf", default="default", help="comma-separated GGUF files for the llama.cpp rows ('default': "
                                                          "the default model's shipped Q4_1 file)")
    parser.add_argument("--start-timeout", type=float, default=1200, help="seconds to wait for each server")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    load_before = load_average()
    rows: list[dict] = []
    skipped: dict[str, str] = {}
    for engine in [e.strip() for e in args.engines.split(",") if e.strip()]:
        if engine not in ENGINES:
            raise SystemExit(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
        if engine == "llama.cpp" and llama_cpp_missing():
            skipped[engine] = llama_cpp_missing()
            continue
        models = [g.strip() for g in args.gguf.split(",") if g.strip()] if engine == "llama.cpp" else [args.model]
        for model in models:
            label = f"finechat serve --engine {engine}" + (f" ({gguf_label(model)})" if engine == "llama.cpp" else "")
            print(f"starting {label} ...", file=sys.stderr, flush=True)
            served = Served(args, engine, levels, model)
            try:
                served.wait(args.start_timeout)
                rows += measure(served.base, "default", levels, args, label)
                if engine == "vllm" and served.child_url:
                    rows += measure(served.child_url, "finechat", levels, args, "bare vLLM server (same child)")
            except SystemExit as e:
                skipped[label] = str(e).splitlines()[0]
            finally:
                served.stop()

    reference = {r["clients"]: r["tps"] for r in rows if r["engine"] == "finechat serve --engine torch"}
    print(f"\nmodel={args.model}, device={args.device}, dtype={args.dtype}, greedy, streaming, max_tokens="
          f"{args.max_tokens}, {args.requests} requests per level\nCPU: {cpu_name()}; load average before / after: "
          f"{load_before} / {load_average()}\n")
    print("| engine | clients | requests | output tokens | output tok/s | TTFT p50 (s) | TTFT p99 (s) | ms/token p50 | "
          "x finechat torch |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ref = reference.get(r["clients"])
        ratio = f"{r['tps'] / ref:.2f}" if ref else "-"
        print(f"| {r['engine']} | {r['clients']} | {r['requests']} | {r['tokens']} | {r['tps']:.1f} | "
              f"{r['ttft50']:.2f} | {r['ttft99']:.2f} | {r['tok50'] * 1000:.0f} | {ratio} |")
    for engine, reason in skipped.items():
        print(f"\n{engine}: skipped: {reason}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

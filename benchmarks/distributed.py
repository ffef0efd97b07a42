"""Full fine-tuning of the default model on 2 processes: per-rank memory and step time for each strategy, side by side.

Every case is the same ``finechat train`` run (recipes/distributed/fsdp2-full.yaml: the ADGEN-like sample, batch
2 per rank, cutoff 256, AdamW fp32) started with ``--nproc-per-node 2`` and ``distributed.strategy=CASE``:

- ``ddp``: every rank holds the whole model, its gradients and AdamW's two moments (16 bytes a parameter);
- ``fsdp2``: PyTorch FSDP2 full shard through accelerate: each rank holds 1/2 of all three;
- ``fsdp2-offload``: the same with ``cpu_offload`` (FSDP2's CPUOffloadPolicy; on CPU ranks without page-locked
  memory, where the shards already sit in CPU memory: the same path, expected to cost the same);
- ``zero3``: DeepSpeed ZeRO-3 (when DeepSpeed is installed).

Each rank reports (``train_results.json``, :func:`finechat.train.distributed.memory_per_rank`) its peak resident
set and its model state: the bytes of weights, one gradient per trainable weight and optimizer state it holds
(its FSDP2 shard / ZeRO partition). Step time = ``train_runtime / max_steps`` (wall clock; other jobs on the
machine slow it). Goal: FSDP2's model state per rank <= 0.55x DDP's. Usage:
    python benchmarks/distributed.py [--steps 4] [--cases ddp,fsdp2,fsdp2-offload,zero3] [--model default]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "distributed" / "fsdp2-full.yaml"
CASES = {
    "ddp": ["distributed.strategy=ddp"],
    "fsdp2": ["distributed.strategy=fsdp2"],
    "fsdp2-offload": ["distributed.strategy=fsdp2", "distributed.cpu_offload=true"],
    "zero3": ["distributed.strategy=zero3"],
}


def run_case(case: str, steps: int, model: str, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "finechat", "train", str(RECIPE), "--nproc-per-node", "2", *CASES[case],
           f"model={model}", f"max_steps={steps}", f"save_steps={steps}", "report_to=[none]",
           f"output_dir={out / case}"]
    print("$ " + " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
        return {"case": case, "error": f"exit {proc.returncode}"}
    metrics = json.loads((out / case / "train_results.json").read_text())["metrics"]
    # DeepSpeed keeps its partitions in its own flat buffers, which the per-rank count does not see
    state = None if case.startswith("zero") else metrics["model_state_mib_per_rank"]
    return {"case": case, "wall_s": round(time.time() - t0, 1),
            "step_s": metrics["train_runtime"] / steps,
            "peak_rss_mib": metrics["peak_rss_mib_per_rank"],
            "state_mib": state,
            "final_loss": metrics.get("final_loss")}


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["case"] == "ddp" and "error" not in r), None)
    lines = ["| strategy | weights+grads+AdamW per rank (MiB) | vs DDP | peak RSS per rank (MiB) | s / step | "
             "final loss |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['error']} | | | | |")
            continue
        state = " / ".join(f"{v:,.0f}" for v in r["state_mib"]) if r["state_mib"] else "not counted"
        ratio = f"{max(r['state_mib']) / max(base['state_mib']):.2f}x" if base and r["state_mib"] else "-"
        lines.append(f"| {r['case']} | {state} | {ratio} | "
                     f"{' / '.join(f'{v:,.0f}' for v in r['peak_rss_mib'])} | {r['step_s']:.2f} | "
                     f"{r['final_loss']:.4f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--model", default="default")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case {unknown[0]!r}; choose from {', '.join(CASES)}")
    if "zero3" in cases and importlib.util.find_spec("deepspeed") is None:
        print("DeepSpeed is not installed: skipping zero3 (pip install 'finechat[dist]')")
        cases.remove("zero3")
    rows = []
    with tempfile.TemporaryDirectory(prefix="finechat-dist-bench-") as tmp:
        for case in cases:
            rows.append(run_case(case, args.steps, args.model, Path(tmp)))
            print(rows[-1], flush=True)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

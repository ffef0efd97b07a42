"""``finechat train --estimate`` against the measured peak resident memory per rank, on the default model.

Each case runs ``finechat train ... --estimate`` (the "peak per process (+ runtime)" row) and then the same
training for a few steps; the measured value is every rank's ``ru_maxrss`` (``peak_rss_mib_per_rank`` in
``train_results.json``). One case at a time, ``OMP_NUM_THREADS=1``; run it under ``nice`` on a shared machine
(peak memory does not move with the load, the time does). Goal (issue 29): estimate within 30% of the largest
rank's peak. The settings are recipes/chatgpt-pipeline.yaml's (LoRA r16, cutoff 128, batch 4, 3 steps) as in
docs/results/distributed.md. Usage:

    python benchmarks/estimate_calibration.py [--cases rm,kto,orpo,simpo,zero2,...] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PREF = ROOT / "data" / "samples" / "preference"
COMMON = ["model=default", "method=lora", "lora_rank=16", "lora_alpha=32", "lora_dropout=0.0", "cutoff_len=128",
          "per_device_train_batch_size=4", "report_to=[none]"]
PAIRS = [f"data=[{PREF / 'arithmetic_pairs.jsonl'}]", "beta=0.1"]
SFT = [f"data=[{PREF / 'arithmetic_sft.jsonl'}]"]
CASES = {  # name: (processes, overrides)
    "rm": (1, ["stage=rm", f"data=[{PREF / 'arithmetic_pairs.jsonl'}]"]),
    "kto": (1, ["stage=kto", *PAIRS]),
    "orpo": (1, ["stage=orpo", *PAIRS]),
    "simpo": (1, ["stage=simpo", *PAIRS]),
    "rm-ddp": (2, ["stage=rm", f"data=[{PREF / 'arithmetic_pairs.jsonl'}]"]),
    "kto-ddp": (2, ["stage=kto", *PAIRS]),
    "orpo-ddp": (2, ["stage=orpo", *PAIRS]),
    "simpo-ddp": (2, ["stage=simpo", *PAIRS]),
    "zero2": (2, [*SFT, "distributed.strategy=zero2"]),
    "zero2-offload": (2, [*SFT, "distributed.strategy=zero2", "distributed.cpu_offload=true"]),
    "zero3": (2, [*SFT, "distributed.strategy=zero3"]),
    "zero3-offload": (2, [*SFT, "distributed.strategy=zero3", "distributed.cpu_offload=true"]),
    "zero3-full": (2, [*SFT, "distributed.strategy=zero3", "method=full", "learning_rate=1e-5"]),
    "fsdp2-full": (2, [*SFT, "distributed.strategy=fsdp2", "method=full", "learning_rate=1e-5"]),
}


def _gib(text: str) -> float:
    value, unit = re.match(r"\s*([\d.]+) (GiB|MiB)", text).groups()
    return float(value) / (1024 if unit == "MiB" else 1)


def run_case(name: str, steps: int, work: Path) -> dict:
    processes, overrides = CASES[name]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = ["--nproc-per-node", str(processes)] if processes > 1 else []
    base = [sys.executable, "-m", "finechat", "train", *COMMON, *overrides]
    est = subprocess.run([*base, "--estimate", *launch], capture_output=True, text=True, env=env, timeout=900)
    row = re.search(r"peak per process \(\+ runtime\) \| ([^|]+)\|", est.stdout)
    if est.returncode != 0 or not row:
        return {"case": name, "error": (est.stderr.strip().splitlines() or ["?"])[-1][:200]}
    estimate = _gib(row.group(1))
    out = work / name
    started = time.monotonic()
    done = subprocess.run([*base, f"output_dir={out}", f"max_steps={steps}", f"save_steps={steps}", *launch],
                          capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode != 0:
        return {"case": name, "estimate_gib": estimate, "error": (done.stderr.strip().splitlines() or ["?"])[-1][:200]}
    ranks = json.loads((out / "train_results.json").read_text())["metrics"]["peak_rss_mib_per_rank"]
    measured = max(ranks) / 1024
    return {"case": name, "processes": processes, "estimate_gib": round(estimate, 2),
            "measured_gib_per_rank": [round(r / 1024, 2) for r in ranks], "ratio": round(estimate / measured, 2),
            "wall_s": round(time.monotonic() - started)}


def table(rows: list[dict]) -> str:
    lines = ["| case | processes | measured peak RSS per rank | estimate per process | estimate / measured |",
             "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | | failed: {r['error']} | | |")
            continue
        ranks = " / ".join(f"{m:.2f}" for m in r["measured_gib_per_rank"])
        lines.append(f"| {r['case']} | {r['processes']} | {ranks} GiB | {r['estimate_gib']:.2f} GiB | {r['ratio']:.2f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="finechat-estimate-") as tmp:
        for name in args.cases.split(","):
            rows.append(run_case(name, args.steps, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=2))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GRPO under FSDP2 on CPU ranks: per-step losses and final LoRA weights against DDP and one process (issue 29).

A tiny Llama (2 layers, hidden 64, the test tokenizer from tests/tiny.py) first trains a LoRA reward model
(``stage: rm``, 4 steps, one process) so that the rollouts get varied scores (the rule rewards score a random
model's text 0 everywhere, which makes every advantage, loss and update 0); then ``stage: grpo`` with ``rewards:
[reward_model]`` runs STEPS steps three ways with the same global batch:

- ``fsdp2``: ``finechat train --nproc-per-node 2 distributed.strategy=fsdp2``, 2 ranks x 2 rows;
- ``ddp``: the same with ``distributed.strategy=ddp``;
- ``1 process``: ``per_device_train_batch_size=4``.

FSDP2 and DDP sample the same completions (TRL seeds each rank's sampler with ``seed + rank``), so their losses
and weights must agree to float rounding. One process draws all the rollouts from the ``seed + 0`` stream, so
its completions, and from step 1 on its losses, differ: the third column shows that this comparison measures
sampling, not sharding. 2 processes x 1 thread, gloo. Usage:

    python benchmarks/grpo_parity.py [--steps 6]

``--zero-full``: instead, ``method: full`` (TRL then builds a separate reference model for the KL term, beta 0.1)
under ``zero2`` and ``zero3``, 2 ranks x 2 rows each: per-step loss and KL side by side (ZeRO-3 once refused a
separate reference; docs/distributed.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "data" / "samples" / "preference" / "arithmetic_sft.jsonl"
PAIRS = ROOT / "data" / "samples" / "preference" / "arithmetic_pairs.jsonl"
COMMON = ["template=null", "method=lora", "lora_target=[q_proj,v_proj]", "lora_dropout=0.0", "cutoff_len=64",
          "report_to=[none]", "logging_steps=1", "seed=3", "max_samples=16"]


def _train(args: list[str], procs: int) -> None:
    cmd = [sys.executable, "-m", "finechat", "train", *COMMON, *args]
    if procs > 1:
        cmd += ["--nproc-per-node", str(procs)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{(done.stdout + done.stderr)[-3000:]}")


def _losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _adapter(out: Path, steps: int) -> dict:
    from safetensors.torch import load_file

    state = load_file(str(out / f"checkpoint-{steps}" / "adapter_model.safetensors"))
    return {k.replace(".default", ""): v for k, v in state.items()}


def _weight_gap(ours: dict, theirs: dict) -> float:
    """Largest difference over the largest weight, over the LoRA tensors (their keys must be the same)."""
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))[:5]
    return max(float((ours[k] - theirs[k]).abs().max() / theirs[k].abs().max().clamp_min(1e-12)) for k in theirs)


def _rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True))


def _zero_full(work: Path, grpo: list[str], steps: int) -> int:
    logs = {}
    for strategy in ("zero2", "zero3"):
        print(f"training grpo, method full: {strategy} ...", flush=True)
        _train([*grpo, "method=full", "learning_rate=0.001", f"output_dir={work / strategy}",
                f"distributed.strategy={strategy}", "per_device_train_batch_size=2"], 2)
        logs[strategy] = [r for r in map(json.loads, (work / strategy / "train_log.jsonl").read_text().splitlines())
                          if "loss" in r]
    print("| step | loss zero2 | loss zero3 | kl zero2 | kl zero3 |\n|---|---|---|---|---|")
    for a, b in zip(logs["zero2"], logs["zero3"], strict=True):
        print(f"| {a['step']} | {a['loss']:.6g} | {b['loss']:.6g} | {a['kl']:.6g} | {b['kl']:.6g} |")
    loss, kl = ([[r[key] for r in logs[s]] for s in ("zero3", "zero2")] for key in ("loss", "kl"))
    print(f"\nzero3 vs zero2 over {len(loss[0])} steps: largest per-step loss difference {_rel(*loss):.2e} "
          f"relative, KL {_rel(*kl):.2e} (KL at the last step {kl[0][-1]:.3g})")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--zero-full", action="store_true", help="method full under zero2 vs zero3 (see above)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import save_tiny_model

    with tempfile.TemporaryDirectory(prefix="finechat-grpo-parity-") as tmp:
        work = Path(tmp)
        model = save_tiny_model(work / "tiny")
        rm = work / "rm"
        _train([f"model={model}", "stage=rm", f"data=[{PAIRS}]", f"output_dir={rm}", "max_steps=4", "save_steps=4",
                "per_device_train_batch_size=4", "learning_rate=0.01"], 1)
        grpo = [f"model={model}", "stage=grpo", f"data=[{PROMPTS}]", f"max_steps={args.steps}",
                f"save_steps={args.steps}", "learning_rate=0.01", "num_generations=2", "max_completion_length=8",
                "rewards=[reward_model]", f"reward_model={rm}/checkpoint-4", "beta=0.1"]
        if args.zero_full:
            return _zero_full(work, grpo, args.steps)
        runs = {"fsdp2": (["distributed.strategy=fsdp2", "per_device_train_batch_size=2"], 2),
                "ddp": (["distributed.strategy=ddp", "per_device_train_batch_size=2"], 2),
                "1 process": (["per_device_train_batch_size=4"], 1)}
        for name, (extra, procs) in runs.items():
            print(f"training grpo: {name} ...", flush=True)
            _train([*grpo, f"output_dir={work / name}", *extra], procs)
        sharded = (work / "fsdp2" / f"checkpoint-{args.steps}" / "pytorch_model_fsdp_0").is_dir()
        losses = {name: _losses(work / name) for name in runs}
        weights = {name: _adapter(work / name, args.steps) for name in runs}
    print("| step | fsdp2 (2 ranks x 2) | ddp (2 ranks x 2) | 1 process (batch 4) |")
    print("|---|---|---|---|")
    for step, row in enumerate(zip(*losses.values(), strict=True), 1):
        print(f"| {step} | " + " | ".join(f"{x:.6g}" for x in row) + " |")
    print(f"\nfsdp2 vs ddp: largest per-step loss difference {_rel(losses['fsdp2'], losses['ddp']):.2e} relative; "
          f"largest LoRA weight difference {_weight_gap(weights['fsdp2'], weights['ddp']):.2e} of the largest weight "
          f"({len(weights['ddp'])} tensors)")
    moved = max(float(v.abs().max()) for k, v in weights["fsdp2"].items() if "lora_B" in k)
    print(f"fsdp2 checkpoint holds FSDP2 shards: {sharded}; largest LoRA B weight after training {moved:.3g} "
          "(0 at the start)")
    print(f"fsdp2 vs 1 process: {_rel(losses['fsdp2'], losses['1 process']):.2e} (losses), "
          f"{_weight_gap(weights['fsdp2'], weights['1 process']):.2e} (weights): other rollouts, see the docstring")
    return 0


if __name__ == "__main__":
    sys.exit(main())

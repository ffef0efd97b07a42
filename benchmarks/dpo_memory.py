"""DPO memory and speed: reference = the base with the LoRA adapter disabled vs a separate reference copy.

On the default model and the arithmetic preference sample (data/samples/preference/arithmetic_pairs.jsonl),
each case runs in its own process (so that its peak memory is its own) with finechat's own base loading,
LoRA preparation and pair tokenization (the SFT path), and the trainers finechat runs. Every case reads the
same pairs in the same order and takes ``--batch`` pairs (examples) per optimizer step:

- ``sft``: LoRA SFT on each pair's prompt + chosen answer: ``batch`` sequences a forward (the goal's baseline);
- ``sft-both``: LoRA SFT on prompt + chosen and prompt + rejected as separate rows: ``2 x batch`` sequences a
  forward, as many as a DPO forward; labelled "equal sequences per forward", it shows what the second answer
  alone costs;
- ``dpo-adapter``: ``finechat train stage=dpo method=lora``: no reference model passed, so TRL runs the reference
  through the policy's own base weights with a frozen copy of the starting adapter (named "ref"; for a new
  adapter that is the base itself, as with the adapter switched off), and finechat's LM head projects only
  answer positions on a CPU (:mod:`finechat.train.compact_head`);
- ``dpo-trl-head``: the same with TRL's own LM head (every position projected on a CPU): what the compact
  head saves;
- ``dpo-copy``: DPO with LoRA and a separate reference model (a second copy of the base weights in memory).

Memory: the process's peak resident set (CPU; peak allocated CUDA memory on a GPU). RSS on a CPU depends on
what the allocator kept from earlier frees, so every case runs ``--repeat`` times (cases interleaved) and the
table shows the median and the range; "before training" is the RSS once the model is loaded, the adapter set
and the trainer built, and "training delta" the peak above it (what the steps themselves add). Steps/s is
measured over the steps after the first (wall clock, so other jobs on the machine slow it; "CPU s / step" is
the process's own CPU time a step, all threads, which they disturb less). Goal: the adapter-as-reference DPO peak at most 1.2x LoRA SFT's. Usage:
    python benchmarks/dpo_memory.py [--steps 3] [--batch 4] [--cutoff-len 128] [--repeat 3] [--model default]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "samples" / "preference" / "arithmetic_pairs.jsonl"
CASES = {  # case: (what it runs, sequences a forward in units of --batch)
    "sft": ("LoRA SFT, prompt + chosen (baseline)", 1),
    "sft-both": ("LoRA SFT, chosen and rejected as rows (equal sequences per forward)", 2),
    "dpo-adapter": ("DPO LoRA, reference through the same base weights (finechat)", 2),
    "dpo-trl-head": ("same, with TRL's own LM head (every position projected)", 2),
    "dpo-copy": ("DPO LoRA, reference = separate copy", 2),
}


def peak_bytes() -> int:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def current_bytes() -> int:
    """Memory in use now: the resident set (Linux) or allocated CUDA memory."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.memory_allocated()
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def run_case(case: str, model: str, steps: int, batch: int, cutoff_len: int) -> dict:
    """Train ``steps`` optimizer steps of one case in this process; returns its numbers."""
    from transformers import TrainerCallback

    from finechat.data.templates import get_template
    from finechat.train.align import load_preference_data
    from finechat.train.methods import prepare_model
    from finechat.train.stage_table import STAGES
    from finechat.train.train_config import TrainConfig
    from finechat.train.trainer_setup import load_base, training_arguments

    out = Path("/tmp") / f"finechat-dpo-memory-{case}"
    cfg = TrainConfig(model=model, stage="dpo", data=[str(DATA)], max_steps=steps, per_device_train_batch_size=batch,
                      cutoff_len=cutoff_len, save_steps=10 ** 6, logging_steps=1, report_to=["none"],
                      output_dir=str(out), overwrite_output_dir=True, lora_dropout=0.0)
    model_obj, tokenizer, _, device = load_base(cfg)
    template = get_template(None, tokenizer, getattr(model_obj.config, "model_type", None))
    rows, _, _ = load_preference_data(cfg, tokenizer, template)
    reference = load_base(cfg)[0].eval() if case == "dpo-copy" else None
    policy = prepare_model(model_obj, cfg)

    times: list[float] = []
    cpu: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter())
            cpu.append(sum(os.times()[:2]))  # user + system seconds of this process, all threads

    if case.startswith("sft"):
        from finechat.data.tokenize import data_collator
        from finechat.train.checkpoints import make_trainer_class

        sides = ("chosen_ids", "rejected_ids") if case == "sft-both" else ("chosen_ids",)
        sft_rows = [{"input_ids": r["prompt_ids"] + r[side], "labels": [-100] * len(r["prompt_ids"]) + r[side]}
                    for r in rows for side in sides]
        cfg.per_device_train_batch_size = batch * len(sides)  # the same pairs a step
        args = training_arguments(cfg, False, device)
        trainer = make_trainer_class()(model=policy, args=args, train_dataset=sft_rows,
                                       data_collator=data_collator(tokenizer), processing_class=tokenizer,
                                       callbacks=[Clock()])
    else:
        from trl import DPOConfig
        from trl.trainer.utils import add_fused_lm_head

        dpo = STAGES["dpo"]
        args = training_arguments(cfg, False, device, args_class=DPOConfig, **dpo.settings(cfg))
        trainer = dpo.trainer(cfg, policy, tokenizer, args, rows, None, [Clock()], {}, {}, ref_model=reference)
        if case == "dpo-trl-head":  # TRL's head again, over finechat's (the fields TRL's DPOTrainer asks for)
            add_fused_lm_head(policy.get_base_model(), outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    before = current_bytes()
    trainer.train()
    per_step = (times[-1] - times[0]) / max(len(times) - 1, 1)
    return {"case": case, "peak_bytes": peak_bytes(), "before_bytes": before,
            "steps_per_second": 1 / per_step if per_step else None, "steps": len(times), "device": device,
            "cpu_seconds_per_step": (cpu[-1] - cpu[0]) / max(len(cpu) - 1, 1)}


def mib(n: float) -> str:
    return f"{n / 2 ** 20:,.0f} MiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4, help="pairs (examples) per optimizer step, every case")
    parser.add_argument("--cutoff-len", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3, help="runs of every case (median and range shown)")
    parser.add_argument("--model", default="default")
    parser.add_argument("--case", choices=list(CASES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print("RESULT " + json.dumps(run_case(args.case, args.model, args.steps, args.batch, args.cutoff_len)))
        return 0
    runs: dict[str, list[dict]] = {case: [] for case in CASES}
    for r in range(args.repeat):
        order = list(CASES) if r % 2 == 0 else list(reversed(CASES))  # no case always runs first
        for case in order:
            proc = subprocess.run([sys.executable, __file__, "--case", case, "--steps", str(args.steps), "--batch",
                                   str(args.batch), "--cutoff-len", str(args.cutoff_len), "--model", args.model],
                                  capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            runs[case].append(json.loads(line[len("RESULT "):]))
            print(f"run {r + 1}/{args.repeat} {case}: peak {mib(runs[case][-1]['peak_bytes'])}", file=sys.stderr)

    def median(case: str, key: str) -> float:
        return statistics.median(x[key] for x in runs[case])

    base_peak = median("sft", "peak_bytes")
    base_delta = statistics.median(x["peak_bytes"] - x["before_bytes"] for x in runs["sft"])
    print(f"DPO memory on {args.model}, {args.batch} pairs a step, cutoff_len {args.cutoff_len}, {args.steps} steps, "
          f"median of {args.repeat} runs a case, {runs['sft'][0]['device']}")
    print("| case | sequences / forward | peak memory | range | x LoRA SFT peak | before training | training delta "
          "| x SFT delta | steps/s | CPU s / step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for case, (label, sequences) in CASES.items():
        peaks = [x["peak_bytes"] for x in runs[case]]
        delta = statistics.median(x["peak_bytes"] - x["before_bytes"] for x in runs[case])
        print(f"| {label} | {sequences * args.batch} | {mib(median(case, 'peak_bytes'))} | "
              f"{mib(min(peaks))} - {mib(max(peaks))} | {median(case, 'peak_bytes') / base_peak:.2f} | "
              f"{mib(median(case, 'before_bytes'))} | {mib(delta)} | {delta / base_delta:.2f} | "
              f"{median(case, 'steps_per_second'):.3f} | {median(case, 'cpu_seconds_per_step'):.1f} |")
    ratio = median("dpo-adapter", "peak_bytes") / base_peak
    print(f"\ngoal: adapter-as-reference DPO <= 1.2x LoRA SFT peak: {ratio:.2f}x -> {'met' if ratio <= 1.2 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

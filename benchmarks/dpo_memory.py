"""DPO memory and speed: reference = the base with the LoRA adapter disabled vs a separate reference copy.

On the default model and the arithmetic preference sample (data/samples/preference/arithmetic_pairs.jsonl),
each case runs in its own process (so that its peak memory is its own) with finechat's own base loading,
LoRA preparation and pair tokenization (the SFT path), and TRL's trainers:

- LoRA SFT on the same prompts and chosen answers, same batch size (the baseline of the goal);
- LoRA SFT on chosen and rejected answers as separate rows, twice the batch: the sequences a DPO step
  puts through the model, so the difference to DPO is what the reference and the pairwise loss cost;
- DPO with LoRA, no reference model passed: TRL switches the adapter off for the reference log-probs
  (what ``finechat train stage=dpo method=lora`` does);
- DPO with LoRA and a separate reference model (a second copy of the base weights in memory).

Peak memory is the process's peak resident set (CPU) or peak allocated CUDA memory; steps/s is measured over
the steps after the first. Goal: the adapter-as-reference DPO run at most 1.2x the peak of LoRA SFT. Usage:
    python benchmarks/dpo_memory.py [--steps 4] [--batch 4] [--cutoff-len 128] [--model default]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "samples" / "preference" / "arithmetic_pairs.jsonl"
CASES = {"sft": "LoRA SFT (baseline)", "sft-both": "LoRA SFT on chosen and rejected (2x sequences a step)",
         "dpo-adapter": "DPO LoRA, reference = adapter disabled", "dpo-copy": "DPO LoRA, reference = separate copy"}


def peak_bytes() -> int:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def run_case(case: str, model: str, steps: int, batch: int, cutoff_len: int) -> dict:
    """Train ``steps`` optimizer steps of one case in this process; returns its numbers."""
    from datasets import Dataset
    from transformers import TrainerCallback

    from finechat.data.templates import get_template
    from finechat.train.align import load_preference_data, make_trainer, stage_settings
    from finechat.train.config import TrainConfig
    from finechat.train.methods import prepare_model
    from finechat.train.recipe import load_base, training_arguments

    out = Path("/tmp") / f"finechat-dpo-memory-{case}"
    stage = "sft" if case.startswith("sft") else "dpo"
    cfg = TrainConfig(model=model, stage="dpo", data=[str(DATA)], max_steps=steps, per_device_train_batch_size=batch,
                      cutoff_len=cutoff_len, save_steps=10 ** 6, logging_steps=1, report_to=["none"],
                      output_dir=str(out), overwrite_output_dir=True, lora_dropout=0.0)
    model_obj, tokenizer, _, device = load_base(cfg)
    template = get_template(None, tokenizer, getattr(model_obj.config, "model_type", None))
    rows, _, _ = load_preference_data(cfg, tokenizer, template)
    reference = load_base(cfg)[0].eval() if case == "dpo-copy" else None
    policy = prepare_model(model_obj, cfg)

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter())

    if stage == "sft":
        from finechat.data.tokenize import data_collator
        from finechat.train.checkpoints import make_trainer_class

        sides = ("chosen_ids", "rejected_ids") if case == "sft-both" else ("chosen_ids",)
        sft_rows = [{"input_ids": r["prompt_ids"] + r[side], "labels": [-100] * len(r["prompt_ids"]) + r[side]}
                    for r in rows for side in sides]
        if case == "sft-both":
            cfg.per_device_train_batch_size = batch * 2
        args = training_arguments(cfg, False, device)
        trainer = make_trainer_class()(model=policy, args=args, train_dataset=sft_rows,
                                       data_collator=data_collator(tokenizer), processing_class=tokenizer,
                                       callbacks=[Clock()])
    else:
        args = training_arguments(cfg, False, device, args_class=__import__("trl").DPOConfig, label_names=[],
                                  **stage_settings(cfg))
        trainer = make_trainer(cfg, policy, tokenizer, args, Dataset.from_list(rows), None, [Clock()], {}, {},
                               ref_model=reference)
    trainer.train()
    per_step = (times[-1] - times[0]) / max(len(times) - 1, 1)
    return {"case": case, "peak_bytes": peak_bytes(), "steps_per_second": 1 / per_step if per_step else None,
            "steps": len(times), "device": device}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4, help="pairs (DPO) or sequences (SFT) per step")
    parser.add_argument("--cutoff-len", type=int, default=128)
    parser.add_argument("--model", default="default")
    parser.add_argument("--case", choices=list(CASES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print("RESULT " + json.dumps(run_case(args.case, args.model, args.steps, args.batch, args.cutoff_len)))
        return 0
    results = {}
    for case in CASES:
        proc = subprocess.run([sys.executable, __file__, "--case", case, "--steps", str(args.steps), "--batch",
                               str(args.batch), "--cutoff-len", str(args.cutoff_len), "--model", args.model],
                              capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        results[case] = json.loads(line[len("RESULT "):])
    base = results["sft"]["peak_bytes"]
    print(f"DPO memory on {args.model}, batch {args.batch}, cutoff_len {args.cutoff_len}, {args.steps} steps, "
          f"{results['sft']['device']}")
    print("| case | peak memory | x LoRA SFT peak | steps/s |")
    print("|---|---|---|---|")
    for case, r in results.items():
        print(f"| {CASES[case]} | {r['peak_bytes'] / 2 ** 20:,.0f} MiB | {r['peak_bytes'] / base:.2f} | "
              f"{r['steps_per_second']:.3f} |")
    ratio = results["dpo-adapter"]["peak_bytes"] / base
    print(f"\ngoal: adapter-as-reference DPO <= 1.2x LoRA SFT peak: {ratio:.2f}x -> {'met' if ratio <= 1.2 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

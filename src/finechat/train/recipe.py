"""The training recipe: one plain function that runs any stage, asking its record what differs.

``run_training(cfg)`` reads top to bottom: look the stage up (:mod:`finechat.train.stage_table`), resolve
resume, check licences, load the base, check the stage supports it, pick the template, read and tokenize the
data with the stage's reader and row adapter, apply the method (LoRA / P-Tuning v2 / full / freeze / QLoRA),
print the memory estimate, write the run file, train with the stage's trainer (transformers' Trainer for SFT
and pretraining, TRL's for the preference and RL stages; DDP / FSDP / DeepSpeed come from torchrun or
accelerate through the Trainer), collect the losses and the stage's metrics, and write the summary.
Multi-stage recipes (pretrain -> SFT -> DPO ...) call it once per stage with the previous stage's checkpoint
as ``adapter`` or ``model`` (:mod:`finechat.train.stages`).

Only rank 0 writes files of its own (loss curve, log, summary); the Trainer already restricts its own.
"""

from __future__ import annotations

import dataclasses
import time

from finechat.console import log
from finechat.data.catalog import LICENCE_FILE, with_data_sources
from finechat.data.templates import get_template
from finechat.errors import ConfigError
from finechat.files import write_json_atomic
from finechat.train import checkpoints
from finechat.train.estimate import estimate_memory
from finechat.train.stage_table import Stage, check_supported, forward_shape, get_stage
from finechat.train.train_config import TrainConfig
from finechat.train.trainer_setup import (
    TrainResult,
    finish_run,
    make_callback,
    run_info,
    run_predict,
    start_run,
    training_arguments,
    world,
)

__all__ = ["TrainResult", "collect_metrics", "run_training", "stage_report"]


def run_training(cfg: TrainConfig, cache_dir: str | None = None) -> TrainResult:
    """Train the stage ``cfg`` names as ``cfg`` says, resumably; returns the final / best checkpoints and metrics."""
    import transformers

    stage = get_stage(cfg.stage)
    if not cfg.data:
        where = f"stage {stage.name}: " if stage.trl else ""
        raise ConfigError(f"{where}no training data: set data: [FILE, ...] (see {stage.samples})")
    args_class = stage.trl()[1] if stage.trl else None  # a missing TRL is said before anything loads
    rank, _, world_size = world()
    is_main = rank == 0
    out, resume, licence, model, tokenizer, device = start_run(cfg)
    check_supported(stage, cfg, model)
    template = get_template(cfg.template, tokenizer, getattr(model.config, "model_type", None))

    def arguments(has_eval: bool) -> object:
        return training_arguments(cfg, has_eval, device, args_class=args_class, **stage.settings(cfg))

    args = arguments(cfg.do_eval and stage.eval_in_training and (cfg.val_size > 0 or bool(cfg.val_file)))
    with args.main_process_first(desc="tokenizing"):
        train_rows, eval_rows, data_info = stage.read(cfg, tokenizer, template, cache_dir)
    train_rows, eval_rows = stage.rows(train_rows), stage.rows(eval_rows)
    has_eval = cfg.do_eval and stage.eval_in_training and bool(eval_rows)
    if has_eval != (args.eval_strategy != "no"):
        args = arguments(has_eval)
    if is_main:
        rows = "streamed training rows" if cfg.streaming else f"{len(train_rows)} training rows"
        log(f"data: {data_info.get('summary') or data_info}; {rows}, {len(eval_rows)} eval rows")

    transformers.set_seed(cfg.seed)  # adapter initialisation does not depend on how much data was read
    model = stage.prepare(model, tokenizer, cfg)
    shape = forward_shape(stage, cfg, train_rows)  # the largest forward pass: sequences, tokens, projected positions
    estimate = estimate_memory(model, dataclasses.replace(cfg, per_device_train_batch_size=shape.sequences),
                               seq_len=shape.seq_len, device=device.split(":")[0],
                               answer_fraction=shape.answer_fraction, reference=shape.reference,
                               fused_head=shape.fused_head)
    if is_main:
        log(f"{stage.name} ({cfg.method}) on {cfg.model}, {shape.sequences} sequences x {shape.seq_len} tokens "
            f"({world_size} process{'es' if world_size > 1 else ''}):\n" + estimate.table())
        if estimate.fits is False:
            log("warning: the estimate exceeds the available memory; lower per_device_train_batch_size or "
                "cutoff_len, or use gradient_checkpointing / qlora")

    licence = with_data_sources(licence, data_info.get("sources", []), cfg.datasets)
    info = run_info(cfg, model, template, licence, data_info)
    if is_main:
        write_json_atomic(out / checkpoints.RUN_FILE, info)
        write_json_atomic(out / LICENCE_FILE, licence)
    trainer = stage.trainer(cfg, model, tokenizer, args, train_rows, eval_rows if has_eval else None,
                            [make_callback(cfg, has_eval)], info, licence)
    t0 = time.time()
    train_output = trainer.train(resume_from_checkpoint=resume)
    metrics = dict(train_output.metrics)
    metrics["train_seconds_this_run"] = round(time.time() - t0, 2)
    collect_metrics(stage, trainer.state.log_history, metrics)
    if cfg.do_predict and stage.policy:
        metrics.update(run_predict(cfg, trainer.model, tokenizer, template))

    return finish_run(out, trainer, metrics, resume, licence, info, stage_report(stage, metrics))


def collect_metrics(stage: Stage, history: list[dict], metrics: dict) -> dict:
    """Loss and the stage's own metrics (first and last logged value; eval values as eval_*), into ``metrics``."""
    losses = [e["loss"] for e in history if "loss" in e]
    if losses:
        metrics["first_loss"], metrics["final_loss"] = losses[0], losses[-1]
    for key, name in stage.metrics.items():
        train = [e[key] for e in history if key in e]
        if train:
            metrics[f"first {name}"], metrics[f"final {name}"] = train[0], train[-1]
        held = [e[f"eval_{key}"] for e in history if f"eval_{key}" in e]
        if held:
            metrics[f"eval {name}"] = held[-1]
    evals = [e["eval_loss"] for e in history if "eval_loss" in e]
    if evals:
        metrics["eval_loss"] = evals[-1]
    return metrics


def stage_report(stage: Stage, metrics: dict) -> str:
    """The stage's own metrics as a table ("" for a stage without any)."""
    rows = [(k, v) for k, v in metrics.items() if any(name in k for name in stage.metrics.values())]
    if not rows:
        return ""
    width = max(len(k) for k, _ in rows)
    return "\n".join([f"| {stage.name.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
                     + [f"| {k.ljust(width)} | {v:.4f} |" if isinstance(v, float) else f"| {k.ljust(width)} | {v} |"
                        for k, v in rows])

"""The parts every training run shares, whatever its stage: resume, licences, base loading, the held-out
split, transformers' TrainingArguments (or a TRL config), the progress callback, the run file, the start and
the finish of a run. :func:`finechat.train.recipe.run_training` puts them together with a stage's record
(:mod:`finechat.train.stage_table`).

Only rank 0 writes files of its own (loss curve, log, summary); the Trainer already restricts its own.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path
from typing import Any

from finechat.config import VERSION, to_dict
from finechat.console import log
from finechat.data.catalog import check_commercial, licence_lines, licence_summary
from finechat.errors import ConfigError
from finechat.files import atomic_file, write_json_atomic
from finechat.models.device import pick_device
from finechat.models.resolve import load_model_and_tokenizer
from finechat.train import checkpoints, distributed
from finechat.train.distributed import world
from finechat.train.methods import base_dtype, quantization_config
from finechat.train.plots import LOSS_PNG, plot_loss
from finechat.train.preflight import check_resume
from finechat.train.train_config import TrainConfig

SUMMARY_FILE = "train_results.json"
LOG_FILE = "train_log.jsonl"


@dataclasses.dataclass
class TrainResult:
    """What a finished run produced."""

    output_dir: str
    final_checkpoint: str | None
    best_checkpoint: str | None
    metrics: dict
    global_step: int
    loss_curve: str | None
    resumed_from: str | None = None
    log_history: list = dataclasses.field(default_factory=list)


# ------------------------------------------------------------------------------------------------------------
# resume and licences
# ------------------------------------------------------------------------------------------------------------

def resolve_resume(cfg: TrainConfig, output_dir: Path, is_main: bool) -> str | None:
    """The checkpoint to resume from: ``auto`` = newest complete one; refuses to silently train over one."""
    if is_main:
        removed = checkpoints.clean_incomplete(output_dir)
        if removed:
            log(f"removed {len(removed)} incomplete save(s) left by an interrupted run: "
                f"{', '.join(p.name for p in removed)}")
    if cfg.resume_from_checkpoint == "auto":
        found = checkpoints.latest_checkpoint(output_dir)
        if found is None:
            log(f"resume_from_checkpoint: auto: no checkpoint in {output_dir}; starting from scratch")
            return None
        log(f"resuming from {found} (step {checkpoints.checkpoint_step(found)})")
        return str(found)
    check_resume(cfg, output_dir)
    return str(Path(cfg.resume_from_checkpoint)) if cfg.resume_from_checkpoint else None


def licences(cfg: TrainConfig) -> dict:
    """Check ``commercial`` against the registry and return the licence summary recorded with the run."""

    check_commercial(cfg.model, cfg.datasets, cfg.commercial)
    if cfg.commercial and not cfg.datasets:
        raise ConfigError("commercial: true needs the registry names of the data in datasets: [...] "
                          "(data known only by its path has an unknown licence)")
    return licence_summary(cfg.model, cfg.datasets)


# ------------------------------------------------------------------------------------------------------------
# model and data
# ------------------------------------------------------------------------------------------------------------

def load_base(cfg: TrainConfig) -> tuple[Any, Any, Path, str]:
    """Load the base model (quantized with bitsandbytes for qlora) and tokenizer; returns (.., device)."""
    import torch

    device = pick_device("auto")
    _, local_rank, _ = world()
    if device == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    dtype = base_dtype(cfg, device.split(":")[0])
    extra: dict[str, Any] = {}
    quant = quantization_config(cfg, torch.bfloat16 if cfg.bf16 else torch.float16 if cfg.fp16 else torch.float32)
    # ChatGLM-6B's ptuning quantizes its frozen base with its own INT4/INT8 (model.quantize), not bitsandbytes
    native_bits = cfg.quantization_bit if cfg.method == "ptuning" and _model_type(cfg.model) == "chatglm" else None
    if quant is not None and not native_bits:
        extra = {"quantization_config": quant, "device_map": {"": device}}
    model, tokenizer, folder = load_model_and_tokenizer(
        cfg.model, dtype=str(dtype).split(".")[-1], device=device, trust_remote_code=cfg.trust_remote_code,
        quantization_bit=native_bits, **extra,
    )
    model.train()
    return model, tokenizer, folder, device


def _model_type(model: str) -> str | None:
    """model_type from a model folder's config.json (None for 'default', a .gguf file or no config)."""
    config = Path(model).expanduser() / "config.json"
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type") if config.is_file() else None
    except (OSError, ValueError):
        return None


def split_holdout(items: list, size: float, seed: int) -> tuple[list, list]:
    """Shuffle a copy with ``seed`` and hold out ``size`` items (a fraction when < 1)."""
    if size <= 0 or not items:
        return items, []
    n = int(size) if size >= 1 else max(1, round(len(items) * size))
    if n >= len(items):
        raise ConfigError(f"val_size {size} leaves no training data ({len(items)} examples)")
    if hasattr(items, "select"):  # memory-mapped rows: index arrays and views, flat in the row count
        import numpy as np

        keep = np.ones(len(items), dtype=bool)
        keep[np.random.default_rng(seed).permutation(len(items))[:n]] = False
        return items.select(np.flatnonzero(keep)), items.select(np.flatnonzero(~keep))
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held = set(order[:n])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]



# ------------------------------------------------------------------------------------------------------------
# Trainer
# ------------------------------------------------------------------------------------------------------------

def training_arguments(cfg: TrainConfig, has_eval: bool, device: str, args_class: Any = None, **extra: Any) -> Any:
    """transformers' TrainingArguments (or a TRL config, ``args_class``) from the flags of the same names."""
    from transformers import TrainingArguments

    eval_steps = cfg.eval_steps or cfg.save_steps
    report_to = [r for r in cfg.report_to if r != "none"]
    if "tensorboard" in report_to:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            log("tensorboard is not installed: no TensorBoard events (pip install 'finechat[train]')")
            report_to.remove("tensorboard")
    settings = dict(
        output_dir=cfg.output_dir,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        max_steps=cfg.max_steps,
        num_train_epochs=cfg.num_train_epochs,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps if cfg.warmup_steps > 0 else cfg.warmup_ratio,  # < 1 is a ratio in v5
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optim,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=None,  # rotation is ours: it keeps the newest and the best checkpoint
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_steps if has_eval else None,
        fp16=cfg.fp16,
        bf16=cfg.bf16,
        # explicit (TRL's configs default to True), under transformers' new name where it has one (the old one
        # warns on every run); use_reentrant=False: a frozen base still passes gradients through checkpointed blocks
        **_checkpointing(cfg.gradient_checkpointing),
        seed=cfg.seed,
        dataloader_num_workers=cfg.dataloader_num_workers,
        report_to=report_to or "none",
        ddp_backend=cfg.ddp_backend,
        ddp_find_unused_parameters=cfg.ddp_find_unused_parameters,
        fsdp=cfg.fsdp or None,
        fsdp_config=cfg.fsdp_config,
        deepspeed=cfg.deepspeed,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        remove_unused_columns=False,  # our rows are plain dicts; packed rows carry position_ids
        label_names=["labels"],
        use_cpu=device == "cpu",
        disable_tqdm=False,
    )
    settings.update(distributed.trainer_arguments(cfg, device))  # ddp / fsdp2 / zero2 / zero3 (train.distributed)
    return (args_class or TrainingArguments)(**{**settings, **extra})


def make_callback(cfg: TrainConfig, has_eval: bool):
    """Loss-curve PNG at each save and at the end, a JSONL log, and a save + eval at the last step."""
    from transformers import TrainerCallback

    out = Path(cfg.output_dir)
    title = f"{cfg.method} on {Path(cfg.model).name}"

    class RunCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_save = True  # the last step always leaves a checkpoint
                control.should_evaluate = has_eval
            return control

        def on_train_begin(self, args, state, control, **kwargs):
            # resumed: drop the steps logged after the checkpoint; started afresh (a run stopped before its
            # first checkpoint, resumed with resume_from_checkpoint=auto): drop them all
            if state.is_world_process_zero:
                truncate_log(out / LOG_FILE, state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                with open(out / LOG_FILE, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"step": state.global_step, **logs}) + "\n")

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                plot_loss(state.log_history, out / LOSS_PNG, title)

        def on_train_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                plot_loss(state.log_history, out / LOSS_PNG, title)

    return RunCallback()


def truncate_log(path: Path, last_step: int) -> int:
    """Keep the log lines up to ``last_step`` (a resumed run logs the later steps again); returns lines dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            step = json.loads(line).get("step", 0)
        except (json.JSONDecodeError, AttributeError):
            dropped += 1  # a line cut by the kill that ended the earlier run
            continue
        if step <= last_step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        with atomic_file(path) as fh:
            fh.write("".join(line + "\n" for line in kept))
    return dropped


def run_info(cfg: TrainConfig, model: Any, template: Any, licence: dict, data_info: dict) -> dict:
    """What ``finechat_run.json`` in every checkpoint says about the run."""
    peft_config = getattr(model, "peft_config", {}).get("default") if hasattr(model, "peft_config") else None
    return {
        "finechat_version": VERSION,
        "method": cfg.method,
        "adapter_type": str(getattr(peft_config, "peft_type", "") or "") or None,
        "stage": cfg.stage,
        "objective": data_info.get("objective"),  # pretrain's; None for other stages
        "template": getattr(template, "name", None),
        "base_model": checkpoints.base_model_identity(getattr(model, "base_model", model), cfg, cfg.model),
        "quantization_bit": cfg.quantization_bit,
        "licenses": licence,
        "data": {"files": cfg.data, "val_file": cfg.val_file, **{k: v for k, v in data_info.items()
                                                                  if isinstance(v, (int, float, str))},
                 "sources": data_info.get("sources", [])},
        "config": to_dict(cfg),
        "world_size": world()[2],
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def run_predict(cfg: TrainConfig, model: Any, tokenizer: Any, template: Any) -> dict:
    """``do_predict``: generate answers for ``predict_file`` (or val_file) with the trained model.

    The generation and metrics belong to ``finechat.eval``; this hook calls its
    ``predict_after_training(model, tokenizer, template, path, output_dir, cfg) -> metrics`` when present.
    """
    try:
        from finechat.eval.predict import predict_after_training
    except ImportError as e:
        raise ConfigError(f"do_predict needs finechat.eval.predict.predict_after_training: {e}") from e
    path = cfg.predict_file or cfg.val_file
    if not path:
        raise ConfigError("do_predict: set predict_file (or val_file) to the data to generate answers for")
    return predict_after_training(model, tokenizer, template, path, cfg.output_dir, cfg)


def start_run(cfg: TrainConfig) -> tuple[Path, str | None, dict, Any, Any, str]:
    """(output folder, checkpoint to resume from, licence summary, base model, tokenizer, device) of a run."""
    import transformers

    out = Path(cfg.output_dir)
    is_main = world()[0] == 0
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    distributed.check_strategy(cfg, _model_type(cfg.model))
    resume = resolve_resume(cfg, out, is_main)
    licence = licences(cfg)
    transformers.set_seed(cfg.seed)
    model, tokenizer, _, device = load_base(cfg)
    return out, resume, licence, model, tokenizer, device

def finish_run(out: Path, trainer: Any, metrics: dict, resume: str | None, licence: dict, info: dict,
               report: str = "") -> TrainResult:
    """The result of a finished run: final / best checkpoints, loss curve, the summary file and table."""
    metrics.update(distributed.memory_per_rank(trainer.model, trainer.optimizer))  # a collective: every rank
    final = checkpoints.latest_checkpoint(out)
    best = checkpoints.best_checkpoint(out)
    png = out / LOSS_PNG
    result = TrainResult(
        output_dir=str(out), final_checkpoint=str(final) if final else None,
        best_checkpoint=str(best) if best else None, metrics=metrics, global_step=trainer.state.global_step,
        loss_curve=str(png) if png.is_file() else None, resumed_from=resume,
        log_history=list(trainer.state.log_history),
    )
    if trainer.is_world_process_zero():
        summary = {k: v for k, v in dataclasses.asdict(result).items() if k != "log_history"}
        write_json_atomic(out / SUMMARY_FILE, {**summary, "licenses": licence, "data": info["data"]})
        log(summary_table(result, licence) + (f"\n{report}" if report else ""))
    return result


def summary_table(result: TrainResult, licence: dict) -> str:
    """The end-of-run report as a table."""

    m = result.metrics
    rows = [("steps", str(result.global_step))]
    for key in ("first_loss", "final_loss", "eval_loss", "train_runtime", "train_samples_per_second",
                "peak_rss_mib_per_rank"):
        if key in m:
            rows.append((key, f"{m[key]:.4f}" if isinstance(m[key], float) else str(m[key])))
    best = str(result.best_checkpoint) if result.best_checkpoint else "none (no evaluation: set val_size or val_file)"
    rows += [("final checkpoint", str(result.final_checkpoint)), ("best checkpoint", best),
             ("loss curve", str(result.loss_curve) if result.loss_curve else "none (no plot written)")]
    rows += [("licence", line) for line in licence_lines(licence)]
    width = max(len(k) for k, _ in rows)
    return "\n".join([f"| {'run'.ljust(width)} | result |", f"|{'-' * (width + 2)}|--------|"]
                     + [f"| {k.ljust(width)} | {v} |" for k, v in rows])


def _checkpointing(enabled: bool) -> dict:
    """Activation (gradient) checkpointing as TrainingArguments keywords: transformers 5.x renamed
    ``gradient_checkpointing[_kwargs]`` to ``activation_checkpointing[_kwargs]`` and warns on the old names."""
    import transformers

    new = any(f.name == "activation_checkpointing" for f in dataclasses.fields(transformers.TrainingArguments))
    name = "activation_checkpointing" if new else "gradient_checkpointing"
    return {name: enabled, **({f"{name}_kwargs": {"use_reentrant": False}} if enabled else {})}

"""Checkpoints users can trust: atomic saves, self-describing folders, auto-resume and safe rotation.

transformers' Trainer writes ``checkpoint-N`` in place, so a run killed mid-save leaves a folder that looks
like a checkpoint but misses files, and ``resume_from_checkpoint`` then crashes on it. Here the Trainer
saves into ``output_dir/.saving/checkpoint-N``; finechat adds its own files (``finechat_run.json`` with
the run config, base model identity, template and data licences) and only then renames the folder into
place with one ``os.replace``: a ``checkpoint-N`` folder exists only when it is complete. The subclass only
redirects where the Trainer's own ``_save_checkpoint`` writes; it does not copy the Trainer.

Rotation (``save_total_limit``) is ours too, because it must never remove the newest checkpoint nor the
one with the lowest eval loss. A checkpoint's step and eval losses are read from its ``trainer_state.json``,
never from its folder name.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from finechat.errors import ModelLoadError
from finechat.files import publish_folder, write_json_atomic
from finechat.train.distributed import enable_fsdp_on_cpu, keep_fsdp_on_cpu
from finechat.train.shard_files import describe_shards

RUN_FILE = "finechat_run.json"
STATE_FILE = "trainer_state.json"
STAGING = ".saving"
PREFIX = "checkpoint-"


def base_model_identity(model: Any, cfg: Any, model_path: str) -> dict:
    """What an adapter needs from its base: checked by ``finechat.models.resolve`` before loading it."""
    config = model.config
    ident = {
        "path": model_path,
        "model_type": getattr(config, "model_type", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "num_hidden_layers": getattr(config, "num_hidden_layers", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "pre_seq_len": cfg.pre_seq_len if cfg.adapter_method == "ptuning" else None,
    }
    return ident


def is_complete(folder: Path) -> bool:
    """A published checkpoint has the run file and the Trainer state (written last in staging)."""
    return (folder / RUN_FILE).is_file() and (folder / STATE_FILE).is_file()


def checkpoint_step(folder: Path) -> int:
    try:
        return int(json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))["global_step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{folder}: unreadable {STATE_FILE}: {e}") from e


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders in ``output_dir``, oldest first (by the step in their trainer state)."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and is_complete(p)]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (what ``resume_from_checkpoint: auto`` continues from)."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def eval_losses(log_history: list[dict]) -> dict[int, float]:
    """step -> eval_loss from a Trainer log history."""
    return {int(e["step"]): float(e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e}


def best_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint with the lowest eval loss recorded at its own step (None without eval)."""
    found = list_checkpoints(output_dir)
    if not found:
        return None
    history = json.loads((found[-1] / STATE_FILE).read_text(encoding="utf-8")).get("log_history", [])
    losses = eval_losses(history)
    scored = [(losses[checkpoint_step(p)], checkpoint_step(p), p) for p in found if checkpoint_step(p) in losses]
    return min(scored)[2] if scored else None


def rotate_checkpoints(output_dir: str | Path, limit: int | None) -> list[Path]:
    """Delete the oldest checkpoints beyond ``limit``, always keeping the newest and the best one."""
    found = list_checkpoints(output_dir)
    if not limit or len(found) <= limit:
        return []
    keep = {found[-1]}
    best = best_checkpoint(output_dir)
    if best is not None:
        keep.add(best)
    for p in reversed(found):
        if len(keep) >= limit:
            break
        keep.add(p)
    removed = [p for p in found if p not in keep]
    for p in removed:
        # rename first so that a kill during rmtree never leaves a half-deleted "complete" checkpoint
        doomed = p.with_name(f".deleting-{p.name}")
        os.replace(p, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return removed


def clean_incomplete(output_dir: str | Path) -> list[Path]:
    """Remove what a killed run left half-written (staging folders, half-deleted checkpoints)."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    leftovers = [p for p in out.iterdir() if p.name == STAGING or p.name.startswith(".deleting-")]
    leftovers += [p for p in out.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and not is_complete(p)]
    for p in leftovers:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return leftovers


def publish(staged: Path, final: Path, run_info: dict, extra_files: dict | None = None) -> None:
    """Write the run file (and extra JSON files) into a staged checkpoint, flush it and rename it into place."""
    for name, data in (extra_files or {}).items():
        write_json_atomic(staged / name, data)
    write_json_atomic(staged / RUN_FILE, run_info)
    publish_folder(staged, final)  # replaces the same step saved again (e.g. after resuming exactly there)


def make_trainer_class(base: Any = None):
    """The Trainer subclass (of ``base``, e.g. a TRL trainer; default transformers' Trainer) that saves atomically
    (built lazily: importing transformers is slow)."""
    from transformers import Trainer

    class AtomicCheckpointTrainer(base or Trainer):
        """transformers' Trainer whose checkpoints appear only when complete (see the module docstring)."""

        def __init__(self, *args: Any, run_info: dict | None = None, keep_checkpoints: int | None = None,
                     extra_files: dict | None = None, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.run_info = run_info or {}
            self.extra_files = extra_files or {}
            self.keep_checkpoints = keep_checkpoints
            self._staging = False

        def create_accelerator_and_postprocess(self) -> None:
            super().create_accelerator_and_postprocess()
            enable_fsdp_on_cpu(self)  # FSDP2 on CPU ranks (accelerate drops the plugin there; see its docstring)

        def _prepare_for_training(self, *args: Any, **kwargs: Any) -> Any:
            keep_fsdp_on_cpu(self)  # an AcceleratorState() built since (TRL GRPO's set_seed) undid it; see there
            return super()._prepare_for_training(*args, **kwargs)

        def _get_output_dir(self, trial: Any) -> str:
            out = super()._get_output_dir(trial)
            return os.path.join(out, STAGING) if self._staging else out

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            run_dir = Path(super()._get_output_dir(trial))
            name = f"{PREFIX}{self.state.global_step}"
            self._staging = True
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._staging = False
            # every rank has written its RNG state into the staging folder before rank 0 publishes it
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                if self.is_fsdp_enabled:  # sharded weights: add the adapter / config / tokenizer as plain files
                    describe_shards(run_dir / STAGING / name, self.model, self.processing_class)
                info = {**self.run_info, "global_step": self.state.global_step}
                publish(run_dir / STAGING / name, run_dir / name, info, self.extra_files)
                shutil.rmtree(run_dir / STAGING, ignore_errors=True)
                rotate_checkpoints(run_dir, self.keep_checkpoints)
            self.accelerator.wait_for_everyone()

    return AtomicCheckpointTrainer

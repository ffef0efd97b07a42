"""Sharded training checkpoints (FSDP2 through torch.distributed.checkpoint, DeepSpeed ZeRO) -> plain folders.

Under ``distributed.strategy: fsdp2`` accelerate saves each rank's shard of the model and optimizer
(``pytorch_model_fsdp_0/``, ``optimizer_0/``: torch.distributed.checkpoint's format); under ZeRO, DeepSpeed saves
its partitions in ``global_stepN/``. The Trainer resumes from these as they are. To chat, evaluate or export,
:func:`consolidate` reads the shards with the engines' own readers (``dcp_to_torch_save``; DeepSpeed's
``get_fp32_state_dict_from_zero_checkpoint``) into one state dict, rebuilds the run's model from the
checkpoint's ``finechat_run.json`` (base, stage, method: the stage's own ``prepare``, so a reward model gets its
score head), loads the weights and writes what the single-process run would have saved: a plain Hugging Face
folder (full / freeze; a ``*ForSequenceClassification`` for stage rm) or a peft adapter (LoRA, QLoRA, P-Tuning v2
prefix; rm's adapter with its score head), with the run file beside it, atomically. A ZeRO checkpoint also holds
the weights the Trainer gathered at save; export reads DeepSpeed's float32 partitions instead (exact under
bf16 / fp16 training, where the gathered copy is 16-bit).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

from finechat.config import resolve_config
from finechat.errors import FinechatError
from finechat.files import check_output_folder, read_json, staged_folder
from finechat.models.resolve import load_model_and_tokenizer
from finechat.train.checkpoints import RUN_FILE
from finechat.train.shard_files import FSDP_MODEL_DIR, full_state_dict, shard_engine
from finechat.train.stage_table import get_stage
from finechat.train.train_config import TrainConfig

COPIED = (RUN_FILE, "finechat_licenses.json", "trainer_state.json")


def run_config(folder: Path) -> TrainConfig:
    """The TrainConfig of the run that wrote ``folder`` (from its finechat_run.json)."""
    run_file = folder / RUN_FILE
    if not run_file.is_file():
        raise FinechatError(f"{folder}: no {RUN_FILE}; not a finechat checkpoint")
    info = read_json(run_file)
    cfg = resolve_config(TrainConfig, base=info.get("config") or {})
    return dataclasses.replace(cfg, distributed=dataclasses.replace(cfg.distributed, strategy="ddp",
                                                                     cpu_offload=False))


def export_config(cfg: TrainConfig) -> TrainConfig:
    """The run's config for rebuilding its trained model in float32: an adapter trained on a 4/8-bit base
    (qlora, ptuning on a quantized base) has the same weights and peft config on a plain base, and loads on the
    quantized one as the single-process run's adapter does."""
    if not cfg.quantization_bit or cfg.adapter_method not in ("lora", "ptuning"):
        return cfg
    return dataclasses.replace(cfg, method=cfg.adapter_method, quantization_bit=None)


def consolidate(folder: str | Path, out: str | Path, force: bool = False) -> dict:
    """Write the plain folder of a sharded checkpoint; returns what was written."""
    folder, out = Path(folder), check_output_folder(out, folder)
    if not folder.is_dir():
        raise FinechatError(f"--checkpoint {folder}: no such folder")
    if out.exists() and any(out.iterdir()) and not force:
        raise FinechatError(f"output folder {out} is not empty; choose another or pass --force")
    kind = shard_engine(folder)  # a ZeRO checkpoint with gathered weights beside: its float32 partitions
    if kind is None:
        raise FinechatError(f"{folder} is not a sharded checkpoint (no {FSDP_MODEL_DIR}/ nor DeepSpeed "
                            "global_step*/); plain checkpoints load as they are")
    cfg = run_config(folder)
    stage = get_stage(cfg.stage)
    state = full_state_dict(folder)
    model, tokenizer, _ = load_model_and_tokenizer(cfg.model, dtype="float32", device="cpu",
                                                   trust_remote_code=cfg.trust_remote_code)
    model = stage.prepare(model, tokenizer, export_config(cfg))  # the run's model: rm's score head, its method
    missing, unexpected = _load(model, state)
    if unexpected or missing:
        raise FinechatError(f"{folder}: the shards do not match the run's model ({len(missing)} missing, "
                            f"{len(unexpected)} unexpected weights, e.g. {(missing or unexpected)[0]})")
    adapter = hasattr(model, "peft_config")
    with staged_folder(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if not adapter:
            tokenizer.save_pretrained(tmp)
        for name in COPIED:
            if (folder / name).is_file():
                shutil.copy2(folder / name, tmp / name)
    return {"kind": kind, "adapter": adapter, "reward_model": cfg.stage == "rm", "out": str(out),
            "tensors": len(state)}


def _load(model: Any, state: dict) -> tuple[list[str], list[str]]:
    """Load the shards' weights; returns (missing, unexpected) names.

    FSDP2 (accelerate) saves a peft model's adapter weights alone, named as peft's own state dict
    (``...lora_A.weight``). DeepSpeed's partitions are named as the model's parameters (``...lora_A.default.weight``,
    ``prompt_encoder.default.embedding.weight``) and hold the trainable ones, the frozen base only where ZeRO kept
    it: a weight counts as missing when it trained and is not there (a frozen one keeps the base's value)."""
    if hasattr(model, "peft_config"):
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        adapter_names = {f".{name}." for name in model.peft_config}
        if not any(tag in key for key in state for tag in adapter_names):  # peft's own names
            wanted = set(get_peft_model_state_dict(model))
            result = set_peft_model_state_dict(model, state)
            # prompt learning (P-Tuning v2): peft loads "prompt_embeddings" into the prompt encoder itself, after
            # the model's load_state_dict has named it unexpected
            loaded = wanted if model.active_peft_config.is_prompt_learning else set()
            return sorted(wanted - set(state)), [k for k in result.unexpected_keys if k in state and k not in loaded]
    result = model.load_state_dict(state, strict=False)
    tied = {name for name, p in model.named_parameters(remove_duplicate=False)} - \
        {name for name, p in model.named_parameters()}
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    missing = [k for k in result.missing_keys if k not in tied and k in trained]
    return missing, list(result.unexpected_keys)

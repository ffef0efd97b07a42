"""The files of a sharded checkpoint: which engine wrote it, its weights as one state dict, and the plain files
that make it describe itself.

Read with the engines' own readers (torch.distributed.checkpoint's ``dcp_to_torch_save``, DeepSpeed's
``get_fp32_state_dict_from_zero_checkpoint``); no process group is needed. Used by the checkpoint writer
(:mod:`finechat.train.checkpoints`, on rank 0 after every rank has written its shard) and by
:mod:`finechat.train.sharded` (export).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from finechat.errors import FinechatError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
FSDP_MODEL_DIR = "pytorch_model_fsdp_0"


def sharded_kind(folder: str | Path) -> str | None:
    """'fsdp2' or 'zero' for a checkpoint whose weights exist only as shards; None for a plain one."""
    folder = Path(folder)
    plain = any((folder / n).is_file() for n in ("model.safetensors", "adapter_model.safetensors",
                                                  "model.safetensors.index.json"))
    kind = shard_engine(folder)
    return kind if kind == "fsdp2" or not plain else None


def shard_engine(folder: str | Path) -> str | None:
    """Which engine's shards a checkpoint holds ('fsdp2', 'zero' or None), plain weights beside them or not.

    A ZeRO checkpoint also holds the weights the Trainer gathered at save (the model's dtype: 16-bit under
    bf16 / fp16); its ``global_stepN/`` partitions hold DeepSpeed's float32 master weights, which export reads.
    """
    folder = Path(folder)
    if (folder / FSDP_MODEL_DIR).is_dir():
        return "fsdp2"
    if (folder / "latest").is_file() and any(folder.glob("global_step*")):
        return "zero"
    return None


def full_state_dict(folder: str | Path) -> dict:
    """The whole model's weights (float32, CPU) from a sharded checkpoint, no process group needed."""
    import torch

    folder = Path(folder)
    kind = shard_engine(folder)
    if kind == "fsdp2":
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(folder / FSDP_MODEL_DIR, Path(tmp) / "model.pt")
            state = torch.load(Path(tmp) / "model.pt", weights_only=True, map_location="cpu")
        return state.get("model", state)
    if kind == "zero":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return dict(get_fp32_state_dict_from_zero_checkpoint(str(folder)))
    raise FinechatError(f"{folder} is not a sharded checkpoint (no {FSDP_MODEL_DIR}/ nor DeepSpeed global_step*/)")


def describe_shards(folder: Path, model: Any, tokenizer: Any) -> None:
    """Make an FSDP2 checkpoint folder self-describing: the model config and tokenizer, and for a peft model its
    adapter in peft's own format (accelerate shards only the adapter's weights, so they are small), so that
    ``finechat chat --adapter CHECKPOINT`` loads it as it is; a full model stays in shards (``finechat export
    --checkpoint`` writes it out)."""
    from safetensors.torch import save_file

    if sharded_kind(folder) != "fsdp2":
        return
    config = getattr(model, "peft_config", None)
    if config:
        state = {k: v.contiguous() for k, v in full_state_dict(folder).items()}
        save_file(state, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        config["default"].save_pretrained(str(folder))
    else:
        model.config.save_pretrained(str(folder))
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(folder))

"""The settings of one training run (``finechat train CONFIG.yaml key=value ...``), checked when built.

Field names are the flags users of ChatGLM-Tuning, ChatGLM-6B's ptuning scripts and transformers' Trainer
already type (``per_device_train_batch_size``, ``lora_rank``, ``pre_seq_len``, ``quantization_bit``, ...),
with the same meanings, so their commands and YAML files carry over unchanged.

:class:`TrainConfig` is composed of six named groups (:data:`GROUPS`: model, data, method, stage, optimisation,
output), each a dataclass with its own fields and checks. The groups are mixed in rather than nested so that
the YAML keys, the ``key=value`` overrides, the ``--flags`` and ``config.FIELD`` stay the flat names users
type (several group names, ``model``, ``data``, ``method``, ``stage``, are themselves such keys), and the run
file ``finechat_run.json`` keeps its flat ``config``. This module imports no torch: ``finechat train --help``
reads it (the ``stage`` field's type lists the stage names of :mod:`finechat.train.stage_table`).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from finechat.config import field
from finechat.data.mixing import MixSettings
from finechat.train.distributed import DistributedConfig

METHODS = ("lora", "ptuning", "full", "freeze", "qlora")


@dataclasses.dataclass
class ModelSettings:
    """What to start from: the base model, its prompt template and an earlier adapter."""

    model: str = field("default", help="'default' (SmolLM2-135M-Instruct), a Hugging Face folder or a .gguf file")
    template: str | None = field(None, help="prompt template; default: the tokenizer's chat template")
    trust_remote_code: bool = field(False, help="allow a model folder's own Python code to run")
    adapter: str | None = field(None, help="start from this adapter (e.g. a previous stage's checkpoint)")


@dataclasses.dataclass
class DataSettings:
    """The training data, how it is read and cut into examples, and its licences."""

    data: list[str] = field([], help="training files (json, jsonl, csv, txt); several are concatenated")
    format: str = field("auto", help="data format of the files (auto detects it)")
    val_file: str | None = field(None, help="a validation file; else val_size of the training data")
    val_size: float = field(0.0, help="fraction (< 1) or number (>= 1) of training examples held out for eval loss")
    max_samples: int | None = field(None, help="use only the first N training examples (quick tries)")
    cutoff_len: int = field(512, help="maximum tokens of one example (prompt + answer)")
    max_source_length: int | None = field(None, help="maximum prompt tokens (ChatGLM ptuning's flag)")
    max_target_length: int | None = field(None, help="maximum answer tokens (ChatGLM ptuning's flag)")
    train_on_prompt: bool = field(False, help="also compute the loss on prompts")
    last_turn_only: bool = field(False, help="labels only on the last assistant turn")
    skip_overlength: bool = field(False, help="drop (and count) examples longer than cutoff_len instead of cutting")
    packing: bool = field(False, help="pack several examples into one cutoff_len sequence (no padding)")
    group_by_length: bool = field(False, help="batch examples of similar length together (less padding)")
    prompt_column: str | None = field(None, help="prompt column of prompt-response data (ADGEN: content)")
    response_column: str | None = field(None, help="response column of prompt-response data (ADGEN: summary)")
    history_column: str | None = field(None, help="history column of prompt-response data")
    on_bad_record: Literal["error", "skip"] = field("error", help="stop at a bad record, or skip and list it")
    document_per: Literal["line", "file"] = field("line", help="stage pretrain: one .txt document per line or per file")
    datasets: list[str] = field(
        [], help="registry names of the data (e.g. alpaca, adgen, finechat-samples): their licences are recorded"
    )
    commercial: bool = field(False, help="refuse data or a base model whose licence forbids commercial use")

    # -- data beyond RAM (issue 30): mixing, streaming, tokenizing processes -------------------------------
    mix: list[float] = field([], help="sampling ratios, one per entry of data, summing to 1 (e.g. [0.7, 0.3]): "
                             "the sources are interleaved by these ratios, deterministic by seed")
    mix_stop: Literal["first_exhausted", "all_exhausted"] = field(
        "first_exhausted", help="mix: stop when the first source runs out, or when all have (restarting the others)")
    streaming: bool = field(False, help="train straight from the data stream (no tokenized cache, no full pass "
                            "first); needs max_steps")
    num_proc: int | None = field(None, help="tokenizing processes (default: picked from the cores and data size)")

    def _check_data(self) -> None:
        if isinstance(self.data, str):
            self.data = [self.data]
        if self.cutoff_len < 1:
            raise ValueError(f"cutoff_len must be >= 1, got {self.cutoff_len}")
        if self.val_size < 0:
            raise ValueError(f"val_size must be >= 0, got {self.val_size}")
        if self.packing and self.group_by_length:
            raise ValueError("packing and group_by_length both remove padding; choose one")


@dataclasses.dataclass
class MethodSettings:
    """How the model is trained: LoRA, P-Tuning v2, full, freeze or QLoRA, and their settings."""

    method: Literal["lora", "ptuning", "full", "freeze", "qlora"] = field(
        "lora", help="lora, ptuning (P-Tuning v2), full, freeze (last layers only) or qlora (LoRA on a 4/8-bit base)"
    )
    lora_rank: int = field(8, help="LoRA rank r")
    lora_alpha: float = field(32.0, help="LoRA alpha (scale = alpha / r, or alpha / sqrt(r) with rsLoRA)")
    lora_dropout: float = field(0.1, help="dropout on the LoRA input")
    lora_target: list[str] = field([], help="module names to adapt, or all-linear; default: picked for the architecture")
    use_rslora: bool = field(False, help="rank-stabilised LoRA scaling")
    use_dora: bool = field(False, help="weight-decomposed LoRA (DoRA)")
    pre_seq_len: int = field(128, help="P-Tuning v2 prefix length (virtual tokens)")
    prefix_projection: bool = field(False, help="P-Tuning v2: reparameterise the prefix with a 2-layer MLP")
    num_layer_trainable: int = field(2, help="freeze: train only the last N decoder layers")
    freeze_trainable_modules: list[str] = field(
        [], help="freeze: train only parameters whose names contain one of these (instead of the last layers)"
    )
    quantization_bit: int | None = field(None, help="load the base in 8 or 4 bits (bitsandbytes) for qlora / ptuning")

    def _check_method(self) -> None:
        if self.method == "qlora" and self.quantization_bit is None:
            self.quantization_bit = 4
        if self.quantization_bit not in (None, 4, 8):
            raise ValueError(f"quantization_bit must be 4 or 8, got {self.quantization_bit}")
        if self.quantization_bit and self.method in ("full", "freeze"):
            raise ValueError(
                f"quantization_bit {self.quantization_bit} cannot be used with method {self.method}: quantized "
                "weights are frozen; use method qlora (LoRA) or ptuning on a quantized base"
            )
        for name in ("lora_rank", "pre_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.num_layer_trainable < 1 and not self.freeze_trainable_modules:
            raise ValueError("num_layer_trainable must be >= 1")


@dataclasses.dataclass
class StageSettings:
    """What is trained for: the stage (finechat.train.stage_table) and the settings of its loss."""

    stage: Literal["sft", "pretrain", "dpo", "orpo", "simpo", "kto", "rm", "grpo"] = field(
        "sft", help="sft: conversations with labels on answers; pretrain: plain text, every token is a target; "
        "dpo / orpo / simpo: preference pairs; kto: answers labelled good or bad; rm: a reward model on pairs; "
        "grpo: online RL with reward functions (finechat.train.align, on TRL)"
    )
    objective: str = field(
        "causal_lm", help="pretraining objective for stage pretrain: causal_lm (or blank_infilling for GLM)"
    )
    blank_infilling: dict = field({}, help="objective blank_infilling: its settings (see finechat.data.blank_infilling)")
    beta: float = field(0.1, help="dpo / kto / orpo / simpo: strength of the preference term (TRL's beta); grpo: KL "
                        "coefficient (0: no reference model)")
    loss: str = field("sigmoid", help="dpo: TRL's loss_type (sigmoid, ipo, hinge, robust, sigmoid_norm, ...)")
    sft_weight: float = field(0.0, help="dpo: weight of a negative log-likelihood term on the chosen answer added to "
                              "the preference loss (RPO; TRL's loss_type 'sft'), which keeps DPO from lowering the "
                              "chosen answers' likelihood too; 0: off")
    simpo_gamma: float = field(0.5, help="simpo: target reward margin")
    rewards: list[str] = field(["correct", "format"], help="grpo: reward functions (correct, format, calculator, "
                               "reward_model), see finechat.train.grpo_rewards")
    reward_model: str | None = field(None, help="a stage-rm checkpoint: grpo's reward_model reward")
    num_generations: int = field(4, help="grpo: answers sampled per prompt (the group)")
    max_completion_length: int = field(64, help="grpo: longest sampled answer in tokens")
    temperature: float = field(1.0, help="grpo: sampling temperature")
    use_vllm: bool = field(False, help="grpo: sample the rollouts with vLLM (TRL's use_vllm); TRL syncs the policy's "
                           "weights into vLLM over NCCL, so this needs CUDA GPUs: on a CPU it is said once and the "
                           "rollouts use PyTorch generation")
    vllm_mode: Literal["colocate", "server"] = field(
        "colocate", help="grpo with use_vllm: colocate = vLLM inside the training process (vllm importable there); "
        "server = a separate `trl vllm-serve --model MODEL` at vllm_server_base_url")
    vllm_server_base_url: str | None = field(None, help="grpo with vllm_mode server: its URL (TRL's default: "
                                             "http://localhost:8000)")


@dataclasses.dataclass
class OptimisationSettings:
    """The optimiser, batches, precision and distribution (transformers' TrainingArguments names)."""

    per_device_train_batch_size: int = field(4, help="examples per device and step")
    per_device_eval_batch_size: int = field(4, help="examples per device in evaluation")
    gradient_accumulation_steps: int = field(1, help="micro-batches summed before each optimizer step")
    max_steps: int = field(-1, help="total optimizer steps (overrides num_train_epochs when > 0)")
    num_train_epochs: float = field(3.0, help="epochs over the training data")
    learning_rate: float = field(1e-4, help="peak learning rate")
    lr_scheduler_type: str = field("linear", help="linear, cosine, constant, constant_with_warmup, ...")
    warmup_ratio: float = field(0.0, help="fraction of steps spent warming up the learning rate")
    warmup_steps: int = field(0, help="warm-up steps (overrides warmup_ratio when > 0)")
    weight_decay: float = field(0.0, help="AdamW weight decay")
    max_grad_norm: float = field(1.0, help="gradient clipping")
    optim: str = field("adamw_torch", help="optimizer name as in transformers (adamw_torch, adafactor, ...)")
    fp16: bool = field(False, help="float16 mixed precision (GPU)")
    bf16: bool = field(False, help="bfloat16 mixed precision")
    gradient_checkpointing: bool = field(False, help="recompute activations in the backward pass (less memory)")
    seed: int = field(42, help="random seed (model init of adapters, data order, dropout)")
    dataloader_num_workers: int = field(0, help="data loading worker processes")
    ddp_backend: str | None = field(None, help="torch.distributed backend (nccl, gloo); default: picked by torch")
    ddp_find_unused_parameters: bool | None = field(None, help="DDP find_unused_parameters")
    fsdp: str = field("", help="FSDP options passed to the Trainer, e.g. 'full_shard auto_wrap'")
    fsdp_config: str | None = field(None, help="FSDP config file (JSON) passed to the Trainer")
    deepspeed: str | None = field(None, help="DeepSpeed config file (JSON) passed to the Trainer")

    def _check_optimisation(self) -> None:
        if self.fp16 and self.bf16:
            raise ValueError("choose one of fp16 and bf16")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps must be > 0 (or -1: train num_train_epochs epochs), got {self.max_steps}")
        if self.num_train_epochs < 0:
            raise ValueError(f"num_train_epochs must be >= 0, got {self.num_train_epochs}")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError("set max_steps > 0 or num_train_epochs > 0")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


@dataclasses.dataclass
class OutputSettings:
    """Where checkpoints, logs and evaluations go, and when they are written."""

    output_dir: str = field("output", help="where checkpoints, logs and the loss curve go")
    save_steps: int = field(500, help="save a checkpoint every N steps")
    save_total_limit: int | None = field(None, help="keep at most N checkpoints (never removes the newest or best)")
    logging_steps: int = field(10, help="log loss and learning rate every N steps")
    eval_steps: int | None = field(None, help="evaluate every N steps (default: save_steps) when there is eval data")
    resume_from_checkpoint: str | None = field(
        None, help="a checkpoint folder, or 'auto' for the newest complete checkpoint in output_dir"
    )
    overwrite_output_dir: bool = field(False, help="allow training into an output_dir that already has checkpoints")
    report_to: list[str] = field(["tensorboard"], help="loggers: tensorboard (when installed), none, ...")
    do_eval: bool = field(True, help="evaluate on the validation data when there is any")
    do_predict: bool = field(False, help="generate answers for the validation data after training (eval hook)")
    predict_file: str | None = field(None, help="file to generate answers for with do_predict (default: val data)")

    def _check_output(self) -> None:
        for name in ("save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_steps is not None and self.eval_steps < 1:
            raise ValueError(f"eval_steps must be >= 1, got {self.eval_steps}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(f"save_total_limit must be >= 1, got {self.save_total_limit}")


@dataclasses.dataclass
class DistributedSettings:
    """How several processes or machines share the run (finechat.train.distributed): the nested
    ``distributed:`` group (``distributed.strategy=fsdp2``); one process ignores it."""

    distributed: DistributedConfig = dataclasses.field(
        default_factory=DistributedConfig, metadata={"help": "strategy (ddp, fsdp2, zero2, zero3) and its options"})


@dataclasses.dataclass
class TrainConfig(DistributedSettings, OutputSettings, OptimisationSettings, StageSettings, MethodSettings, DataSettings, ModelSettings):
    """One fine-tuning, continued-pretraining or alignment run: the groups of :data:`GROUPS`, flat keys (and the
    nested ``distributed:`` group)."""

    def __post_init__(self) -> None:
        self._check_data()
        self._check_method()
        self._check_optimisation()
        self._check_output()
        if self.stage == "kto" and self.per_device_train_batch_size < 2:  # across groups: stage x optimisation
            raise ValueError("stage kto needs per_device_train_batch_size >= 2 (KTO's KL term pairs each answer with "
                             f"another prompt's in the same batch), got {self.per_device_train_batch_size}")
        self._check_data_beyond_ram()

    def _check_data_beyond_ram(self) -> None:
        if self.streaming and self.max_steps <= 0:
            raise ValueError("streaming: true needs max_steps > 0 (a stream has no length to count epochs in)")
        if self.streaming and (self.packing or self.val_size or self.max_samples):
            raise ValueError("streaming: true reads the data once as it trains: packing, val_size and max_samples "
                             "need the whole data first (give a val_file instead of val_size)")
        if self.mix:
            MixSettings(list(self.mix), self.mix_stop, self.seed).check(len(self.data))
        if self.num_proc is not None and self.num_proc < 1:
            raise ValueError(f"num_proc must be >= 1, got {self.num_proc}")

    @property
    def adapter_method(self) -> str:
        """The peft method actually put on the base: qlora is LoRA on a quantized base."""
        return "lora" if self.method == "qlora" else self.method

    def group(self, name: str) -> dict:
        """The values of one group (``model``, ``data``, ``method``, ``stage``, ``optimisation``, ``output``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(GROUPS[name])}


GROUPS: dict[str, type] = {"model": ModelSettings, "data": DataSettings, "method": MethodSettings,
                           "stage": StageSettings, "optimisation": OptimisationSettings, "output": OutputSettings,
                           "distributed": DistributedSettings}

"""Preference and RL stages on TRL: ``stage: dpo | orpo | simpo | kto | rm | grpo``.

The run is SFT's (:mod:`finechat.train.recipe`): the same config file and overrides, resume, licence check,
base loading, methods (LoRA / full / freeze / QLoRA through :func:`finechat.train.methods.prepare_model`),
atomic self-describing checkpoints, loss PNG, JSONL log and TensorBoard. What changes is the data and the
trainer, which is TRL's (the field's library for these losses; nothing here re-implements one):

- ``dpo``: TRL's DPOTrainer with ``loss`` = its ``loss_type`` (sigmoid, ipo, hinge, ...) and ``beta``, plus TRL's
  ``sft`` loss on the chosen answer weighted by ``sft_weight`` when that is set (RPO). With
  LoRA the model is a peft model and no reference model is passed, so TRL computes the reference log-probs
  through the same base weights with a frozen copy of the starting adapter ("ref"; for a new adapter, the base
  itself): the base weights are held once. On a CPU the LM head projects answer positions only
  (:mod:`finechat.train.compact_head`; see benchmarks/dpo_memory.py).
- ``rm``: TRL's RewardTrainer on the base with a one-score head (:mod:`finechat.models.reward_head`); LoRA uses
  peft's SEQ_CLS task so the head is trained and saved with the adapter. Scored by pairwise accuracy.
- ``kto``: TRL's KTOTrainer on answers labelled desirable / undesirable (pairs count as one of each).
- ``orpo`` / ``simpo``: TRL's ORPOTrainer and CPOTrainer (``loss_type="simpo"``) from ``trl.experimental``.
- ``grpo``: TRL's GRPOTrainer, sampling ``num_generations`` answers per prompt and scoring them with the
  reward functions of :mod:`finechat.train.grpo_rewards` against the data's reference answers.

Every stage's rows are tokenized here, through the SFT path (``finechat.data.pairs``,
``preference.split_answer`` for GRPO's prompts), so the template, special tokens and masking are SFT's; each
TRL trainer gets them in the layout its own tokenizing step would produce, and a narrow subclass tells it
they arrive tokenized (:func:`_takes_finechat_rows`). TRL re-tokenizing decoded text instead could merge BPE
tokens across the prompt / answer boundary or add BOS / EOS the template never wrote.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import random
import time
from typing import Any

from finechat.console import log
from finechat.data.catalog import LICENCE_FILE
from finechat.data.conversation import Conversation
from finechat.data.formats import read_conversations
from finechat.data.pairs import PreferenceStats, read_preferences, split_answer, tokenize_preferences
from finechat.data.templates import get_template
from finechat.data.tokenize import IGNORE_INDEX, special_token_layout
from finechat.errors import ConfigError
from finechat.eval.reward_scoring import load_reward_model
from finechat.files import write_json_atomic
from finechat.models.reward_head import reward_model_from
from finechat.train import checkpoints
from finechat.train.compact_head import compact_log_prob_head
from finechat.train.estimate import estimate_memory
from finechat.train.grpo_rewards import get_rewards
from finechat.train.methods import default_lora_targets, prepare_model, trainable_to_float32
from finechat.train.recipe import (
    TrainResult,
    finish_run,
    make_callback,
    run_info,
    run_training,
    split_holdout,
    start_run,
    training_arguments,
    world,
)
from finechat.train.train_config import TrainConfig

ALIGN_STAGES = ("dpo", "orpo", "simpo", "kto", "rm", "grpo")
PAIR_STAGES = ("dpo", "orpo", "simpo", "rm")
# Stages the native ChatGLM-6B runs: its forward builds the GLM mask and 2D positions from the ids itself,
# which the SFT path's rows keep ([gMASK]<sop> between prompt and answer); rm needs a sequence-classification
# head and grpo generates through TRL's own loop.
CHATGLM_STAGES = ("dpo", "orpo", "simpo", "kto")
STAGE_METRICS = {  # what each stage's TRL trainer logs, as the summary names it
    "dpo": {"rewards/accuracies": "preference accuracy", "rewards/margins": "reward margin"},
    "orpo": {"rewards/accuracies": "preference accuracy", "rewards/margins": "reward margin"},
    "simpo": {"rewards/accuracies": "preference accuracy", "rewards/margins": "reward margin"},
    "kto": {"rewards/chosen_sum": "desirable reward sum", "rewards/rejected_sum": "undesirable reward sum",
            "kl": "kl"},
    "rm": {"accuracy": "pairwise accuracy", "margin": "reward margin"},
    "grpo": {"reward": "reward", "kl": "kl"},
}


def run_stage(cfg: TrainConfig, cache_dir: str | None = None) -> TrainResult:
    """``finechat train``: SFT / pretraining on transformers' Trainer, preference and RL stages on TRL."""
    if cfg.stage in ALIGN_STAGES:
        return run_alignment(cfg)
    return run_training(cfg, cache_dir)


def sequences_per_example(cfg: TrainConfig) -> int:
    """Sequences one training example puts through the model: 2 for a pair, num_generations for GRPO."""
    return 2 if cfg.stage in PAIR_STAGES else cfg.num_generations if cfg.stage == "grpo" else 1


def check_supported(cfg: TrainConfig, model: Any) -> None:
    """A clear error for a method the model cannot be trained with."""
    model_type = getattr(model.config, "model_type", "")
    if model_type == "chatglm" and cfg.stage not in CHATGLM_STAGES:
        why = ("transformers has no sequence-classification class for it" if cfg.stage == "rm"
               else f"TRL's {cfg.stage} trainer generates through its own loop, without ChatGLM's GLM mask and 2D "
               "positions")
        raise ConfigError(f"stage {cfg.stage} does not work with the native ChatGLM-6B: {why}; stages that work "
                          f"with it: {', '.join(CHATGLM_STAGES)} (and sft)")
    if cfg.adapter_method == "ptuning":
        raise ConfigError(f"stage {cfg.stage} with method ptuning: TRL's trainers need the adapter to switch off "
                          "for the reference model; use lora, qlora, full or freeze")
    if cfg.sft_weight < 0 or (cfg.sft_weight and cfg.stage != "dpo"):
        raise ConfigError(f"sft_weight: {cfg.sft_weight} for stage {cfg.stage}; it is the weight (0 or more) of "
                          "DPO's chosen-answer likelihood term, for stage dpo only")
    if cfg.stage == "grpo" and (cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps) \
            % cfg.num_generations:
        raise ConfigError(f"stage grpo: per_device_train_batch_size x gradient_accumulation_steps "
                          f"({cfg.per_device_train_batch_size} x {cfg.gradient_accumulation_steps}) must be a "
                          f"multiple of num_generations ({cfg.num_generations}): each prompt's answers form a group")


# ------------------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------------------

def _pair_row(row: dict) -> dict:
    """A tokenized pair in the layout TRL's ORPO / CPO ``tokenize_row`` produces (labels -100 on the prompt)."""
    prompt = row["prompt_ids"]
    out = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for side in ("chosen", "rejected"):
        ids = prompt + row[f"{side}_ids"]
        out.update({f"{side}_input_ids": ids, f"{side}_attention_mask": [1] * len(ids),
                    f"{side}_labels": [IGNORE_INDEX] * len(prompt) + row[f"{side}_ids"]})
    return out


def _rows_for(stage: str, rows: list[dict]) -> list[dict]:
    """Tokenized pair / labelled rows in the layout the stage's TRL trainer has after its own tokenizing step."""
    if stage in ("orpo", "simpo"):
        return [_pair_row(r) for r in rows]
    if stage == "rm":  # whole sequences, scored at their last token
        return [{"chosen_ids": r["prompt_ids"] + r["chosen_ids"], "rejected_ids": r["prompt_ids"] + r["rejected_ids"]}
                for r in rows]
    return rows  # dpo: {prompt_ids, chosen_ids, rejected_ids}; kto: {prompt_ids, completion_ids, label}


def load_preference_data(cfg: TrainConfig, tokenizer: Any, template: Any) -> tuple[list[dict], list[dict], dict]:
    """(train rows, eval rows, info) for a preference stage; bad records and no-room prompts are counted."""
    kind = "labelled" if cfg.stage == "kto" else "pairs"
    result = read_preferences(cfg.data, cfg.format, cfg.on_bad_record, kind=kind)
    if result.skipped:
        log(result.skipped_table())
    records = result.records[: cfg.max_samples or None]
    if cfg.stage == "kto":
        random.Random(cfg.seed).shuffle(records)
    if cfg.val_file:
        evals = read_preferences([cfg.val_file], cfg.format, cfg.on_bad_record, kind=kind).records
    else:
        records, evals = split_holdout(records, cfg.val_size, cfg.seed)
    stats = PreferenceStats(skipped_records=len(result.skipped))
    train, stats = tokenize_preferences(records, tokenizer, template, cfg.cutoff_len, stats)
    eval_stats = PreferenceStats()
    held, eval_stats = tokenize_preferences(evals, tokenizer, template, cfg.cutoff_len, eval_stats)
    if not train:
        raise ConfigError(f"no training rows left from {', '.join(cfg.data)}: {stats.summary()}")
    info = {"stage": cfg.stage, "format": result.format, "summary": stats.summary(), "records": stats.records,
            "skipped_records": len(result.skipped), "no_room": len(stats.no_room) + len(eval_stats.no_room),
            "truncated": stats.truncated, "train_rows": len(train), "eval_rows": len(held)}
    return _rows_for(cfg.stage, train), _rows_for(cfg.stage, held), info


def load_prompt_data(cfg: TrainConfig, tokenizer: Any, template: Any) -> tuple[list[dict], list[dict], dict]:
    """GRPO rows from SFT data: the prompt's SFT ids (``prompt_ids``) and text, its reference answer (``gold``)."""
    layout = special_token_layout(tokenizer, template)

    def rows(convs: list) -> list[dict]:
        out = []
        for conv in convs:
            messages = conv.messages()
            # generation starts from the ids SFT gives this prompt (special tokens included, each once), not from
            # TRL re-tokenizing text; the text, those ids decoded, is what the reward functions read
            prompt = Conversation(conv.turns[:-1], system=conv.system, tools=conv.tools, source=conv.source,
                                  line=conv.line)
            prompt_ids, _ = split_answer(prompt, messages[-1]["content"], tokenizer, template, layout)
            out.append({"prompt": tokenizer.decode(prompt_ids, skip_special_tokens=False), "prompt_ids": prompt_ids,
                        "gold": messages[-1]["content"], "prompt_messages": json.dumps(messages[:-1])})
        return out

    result = read_conversations(cfg.data, format=cfg.format, on_bad_record=cfg.on_bad_record)
    if result.skipped:
        log(result.skipped_table())
    convs = result.conversations[: cfg.max_samples or None]
    if cfg.val_file:
        evals = read_conversations([cfg.val_file], format=cfg.format, on_bad_record=cfg.on_bad_record).conversations
    else:
        convs, evals = split_holdout(convs, cfg.val_size, cfg.seed)
    train = rows(convs)
    info = {"stage": "grpo", "format": result.format, "records": len(train),
            "skipped_records": len(result.skipped), "train_rows": len(train), "eval_rows": len(evals),
            "summary": f"{len(train)} prompts with reference answers, {len(result.skipped)} bad records skipped"}
    return train, rows(evals), info


# ------------------------------------------------------------------------------------------------------------
# models and trainers
# ------------------------------------------------------------------------------------------------------------

def prepare_reward_model(model: Any, tokenizer: Any, cfg: TrainConfig) -> Any:
    """The base with a one-score head, with the method applied (LoRA as peft's SEQ_CLS task: head trained)."""
    classifier = reward_model_from(model, tokenizer.pad_token_id)
    if cfg.adapter_method != "lora" or cfg.adapter:
        classifier = prepare_model(classifier, cfg)
        for name, p in classifier.named_parameters():
            if name.split(".")[-2:-1] == ["score"] or ".score." in name:
                p.requires_grad = True  # the new head always trains
        return classifier
    from peft import LoraConfig, get_peft_model

    if cfg.quantization_bit:
        from peft import prepare_model_for_kbit_training

        classifier = prepare_model_for_kbit_training(classifier, cfg.gradient_checkpointing)
    targets = cfg.lora_target or default_lora_targets(classifier)
    lora = LoraConfig(task_type="SEQ_CLS", r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules="all-linear" if targets in (["all-linear"], "all-linear") else targets,
                      use_rslora=cfg.use_rslora, use_dora=cfg.use_dora)
    classifier = get_peft_model(classifier, lora)
    classifier.config.use_cache = False
    return classifier


def _trl_classes(stage: str) -> tuple[Any, Any]:
    """(trainer class, config class) of TRL for a stage; a clear error when TRL is missing."""
    try:
        import trl
    except ImportError as e:
        raise ConfigError(f"stage {stage} needs TRL: pip install 'finechat[align]'") from e
    if stage == "dpo":
        return trl.DPOTrainer, trl.DPOConfig
    if stage == "rm":
        return trl.RewardTrainer, trl.RewardConfig
    if stage == "kto":
        return trl.KTOTrainer, trl.KTOConfig
    if stage == "grpo":
        return trl.GRPOTrainer, trl.GRPOConfig
    if stage == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOTrainer, ORPOConfig
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    return CPOTrainer, CPOConfig


def stage_settings(cfg: TrainConfig) -> dict:
    """The TRL config fields of a stage (beyond the Trainer flags every stage shares)."""
    if cfg.stage == "dpo":
        losses = {"loss_type": [cfg.loss]}
        if cfg.sft_weight:
            losses = {"loss_type": [cfg.loss, "sft"], "loss_weights": [1.0, cfg.sft_weight]}
        return {"beta": cfg.beta, **losses, "max_length": cfg.cutoff_len}
    if cfg.stage == "rm":
        return {"max_length": cfg.cutoff_len}
    if cfg.stage == "kto":
        # KTO's KL term pairs each answer with its batch neighbour's prompt, so TRL needs a fixed order
        # (the rows are shuffled with the seed when read instead)
        return {"beta": cfg.beta, "max_length": cfg.cutoff_len, "train_sampling_strategy": "sequential"}
    if cfg.stage == "orpo":
        return {"beta": cfg.beta, "max_length": cfg.cutoff_len}
    if cfg.stage == "simpo":
        return {"beta": cfg.beta, "loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": cfg.simpo_gamma,
                "max_length": cfg.cutoff_len}
    return {"beta": cfg.beta, "num_generations": cfg.num_generations, "temperature": cfg.temperature,
            "max_completion_length": cfg.max_completion_length, "log_completions": False, **grpo_vllm_settings(cfg)}


def grpo_vllm_settings(cfg: TrainConfig) -> dict:
    """TRL's vLLM rollout settings for ``use_vllm: true``; on a machine without CUDA, said once and left off.

    TRL moves the policy's weights into vLLM after each step through NCCL (colocated: vLLM's own weight loading in
    the same CUDA process; server: ``trl vllm-serve``'s NCCL communicator), which has no CPU backend."""
    if not cfg.use_vllm:
        return {}
    import torch

    if not torch.cuda.is_available():
        log("grpo: use_vllm is set, but TRL's vLLM rollouts sync the policy's weights into vLLM over NCCL, which "
            "needs CUDA GPUs; this machine has none, so the rollouts use PyTorch generation (same rewards and reports)")
        return {}
    if cfg.vllm_mode == "colocate" and importlib.util.find_spec("vllm") is None:
        raise ConfigError("grpo: use_vllm with vllm_mode colocate needs vllm importable in finechat's environment "
                          "(pip install vllm); or start `trl vllm-serve --model MODEL` where vLLM is installed and "
                          "set vllm_mode: server")
    settings: dict = {"use_vllm": True, "vllm_mode": cfg.vllm_mode}
    if cfg.vllm_mode == "server" and cfg.vllm_server_base_url:
        settings["vllm_server_base_url"] = cfg.vllm_server_base_url
    return settings


def _takes_finechat_rows(stage: str, base: type) -> type:
    """``base`` (a TRL trainer) told that the stage's rows arrive tokenized by the SFT path.

    Each override skips only TRL's own tokenizing, which would re-tokenize decoded text and so could merge BPE
    tokens across the prompt / answer boundary, add BOS / EOS the template did not write, or truncate by other rules.
    """
    if stage == "dpo":
        class FinechatDPOTrainer(base):
            """DPO on rows finechat tokenized with the SFT template (TRL would otherwise re-tokenize text), with
            the LM head projecting answer positions only on a CPU (:mod:`finechat.train.compact_head`)."""

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                policy = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
                for m in (policy, self.ref_model):
                    if m is not None:
                        compact_log_prob_head(m)

            def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
                if "prompt_ids" in dataset.column_names:
                    return dataset
                return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

        return FinechatDPOTrainer
    if stage == "kto":
        class FinechatKTOTrainer(base):
            def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
                if "prompt_ids" not in dataset.column_names:
                    return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
                if not self.calculate_KL:
                    return dataset

                # What TRL does after tokenizing: KL's mismatched pairs give each prompt the answer before it in
                # its batch of per_device_train_batch_size rows (the first takes the last)
                def rotate(batch: dict) -> dict:
                    batch["KL_completion_ids"] = batch["completion_ids"][-1:] + batch["completion_ids"][:-1]
                    return batch

                return dataset.map(rotate, batched=True, batch_size=args.per_device_train_batch_size)

        return FinechatKTOTrainer
    if stage in ("orpo", "simpo"):
        class FinechatPairTrainer(base):
            def tokenize_row(self, feature: dict, model: Any = None) -> dict:
                if "chosen_labels" in feature:
                    return feature
                return super().tokenize_row(feature, model)

        return FinechatPairTrainer
    if stage == "grpo":
        class FinechatGRPOTrainer(base):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self.sft_prompt_ids = {}  # prompt text -> its ids
                for data in (self.train_dataset, self.eval_dataset):
                    if "prompt_ids" in getattr(data, "column_names", ()):
                        self.sft_prompt_ids.update(zip(data["prompt"], data["prompt_ids"]))

            def _tokenize_prompts(self, prompts: list) -> tuple:
                # The rows' prompt text is for the reward functions; generation starts from its SFT ids
                if all(isinstance(p, str) and p in self.sft_prompt_ids for p in prompts):
                    return [self.sft_prompt_ids[p] for p in prompts], None, {}
                return super()._tokenize_prompts(prompts)

        return FinechatGRPOTrainer
    return base


def make_trainer(cfg: TrainConfig, model: Any, tokenizer: Any, args: Any, train: Any, evals: Any, callbacks: list,
                 info: dict, licence: dict, reward_funcs: list | None = None, ref_model: Any = None) -> Any:
    """TRL's trainer for the stage, saving atomically like every finechat run (``ref_model``: DPO's reference as
    a separate model; by default a LoRA policy is its own reference: TRL keeps a frozen copy of its starting adapter)."""
    trainer_class, _ = _trl_classes(cfg.stage)
    base = _takes_finechat_rows(cfg.stage, checkpoints.make_trainer_class(trainer_class))
    kwargs: dict[str, Any] = dict(model=model, args=args, train_dataset=train, eval_dataset=evals,
                                  processing_class=tokenizer, callbacks=callbacks, run_info=info,
                                  keep_checkpoints=cfg.save_total_limit, extra_files={LICENCE_FILE: licence})
    if cfg.stage == "grpo":
        kwargs["reward_funcs"] = reward_funcs
    if ref_model is not None:
        kwargs["ref_model"] = ref_model
    trainer = base(**kwargs)
    if cfg.quantization_bit:  # TRL puts a quantized model's trainable weights in bf16; finechat's rule is float32
        trainable_to_float32(trainer.model)
    return trainer


def grpo_rewards(cfg: TrainConfig) -> list:
    """The reward functions of a grpo stage (loading the reward model when one is named)."""
    rm = None
    if "reward_model" in cfg.rewards:
        if not cfg.reward_model:
            raise ConfigError("rewards: reward_model needs reward_model: DIR (a stage-rm checkpoint)")
        rm = load_reward_model(cfg.reward_model)
    return get_rewards(cfg.rewards, rm)


# ------------------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------------------

def run_alignment(cfg: TrainConfig) -> TrainResult:
    """Train a preference / RL stage as ``cfg`` says, resumably; returns checkpoints and metrics."""
    import transformers
    from datasets import Dataset


    if not cfg.data:
        raise ConfigError(f"stage {cfg.stage}: no training data: set data: [FILE, ...] (see data/samples/preference_*)")
    _, trl_config = _trl_classes(cfg.stage)
    is_main = world()[0] == 0
    out, resume, licence, model, tokenizer, device = start_run(cfg)
    check_supported(cfg, model)
    template = get_template(cfg.template, tokenizer, getattr(model.config, "model_type", None))
    if cfg.stage == "grpo":
        train_rows, eval_rows, data_info = load_prompt_data(cfg, tokenizer, template)
    else:
        train_rows, eval_rows, data_info = load_preference_data(cfg, tokenizer, template)
    has_eval = cfg.do_eval and bool(eval_rows) and cfg.stage != "grpo"  # grpo: held-out reward in the pipeline
    if is_main:
        log(f"data: {data_info['summary']}; {len(train_rows)} training rows, {len(eval_rows)} eval rows")

    transformers.set_seed(cfg.seed)
    model = prepare_reward_model(model, tokenizer, cfg) if cfg.stage == "rm" else prepare_model(model, cfg)
    sequences = sequences_per_example(cfg)
    estimate = estimate_memory(model, dataclasses.replace(
        cfg, per_device_train_batch_size=cfg.per_device_train_batch_size * sequences), seq_len=cfg.cutoff_len,
        device=device.split(":")[0])
    if is_main:
        log(f"{cfg.stage} ({cfg.method}) on {cfg.model}, {sequences} sequence(s) per example:\n" + estimate.table())

    args = training_arguments(cfg, has_eval, device, args_class=trl_config, label_names=[],
                              **stage_settings(cfg))
    info = run_info(cfg, model, template, licence, data_info)
    if is_main:
        write_json_atomic(out / checkpoints.RUN_FILE, info)
        write_json_atomic(out / LICENCE_FILE, licence)
    trainer = make_trainer(cfg, model, tokenizer, args, Dataset.from_list(train_rows),
                           Dataset.from_list(eval_rows) if has_eval else None, [make_callback(cfg, has_eval)],
                           info, licence, grpo_rewards(cfg) if cfg.stage == "grpo" else None)
    t0 = time.time()
    train_output = trainer.train(resume_from_checkpoint=resume)
    metrics = collect_metrics(cfg.stage, trainer.state.log_history, dict(train_output.metrics))
    metrics["train_seconds_this_run"] = round(time.time() - t0, 2)

    return finish_run(out, trainer, metrics, resume, licence, info, stage_table(cfg.stage, metrics))


def collect_metrics(stage: str, history: list[dict], metrics: dict) -> dict:
    """Loss and the stage's own metrics (first and last logged value; eval values as eval_*)."""
    losses = [e["loss"] for e in history if "loss" in e]
    if losses:
        metrics["first_loss"], metrics["final_loss"] = losses[0], losses[-1]
    for key, name in STAGE_METRICS[stage].items():
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


def stage_table(stage: str, metrics: dict) -> str:
    """The stage's own metrics as a table."""
    rows = [(k, v) for k, v in metrics.items() if any(name in k for name in STAGE_METRICS[stage].values())]
    if not rows:
        return ""
    width = max(len(k) for k, _ in rows)
    return "\n".join([f"| {stage.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
                     + [f"| {k.ljust(width)} | {v:.4f} |" if isinstance(v, float) else f"| {k.ljust(width)} | {v} |"
                        for k, v in rows])

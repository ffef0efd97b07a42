"""Preference and RL stages on TRL: ``stage: dpo | orpo | simpo | kto | rm | grpo``.

The parts of these stages for their records in :mod:`finechat.train.stage_table`; the run is every stage's
(:func:`finechat.train.recipe.run_training`): the same config file and overrides, resume, licence check,
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
they arrive tokenized (``*_rows_trainer``). TRL re-tokenizing decoded text instead could merge BPE
tokens across the prompt / answer boundary or add BOS / EOS the template never wrote.
"""

from __future__ import annotations

import importlib.util
import json
import random
from collections.abc import Callable
from typing import Any

from finechat.console import log
from finechat.data.catalog import LICENCE_FILE
from finechat.data.conversation import Conversation
from finechat.data.formats import read_conversations
from finechat.data.pairs import PreferenceStats, read_preferences, split_answer, tokenize_preferences
from finechat.data.tokenize import IGNORE_INDEX, special_token_layout
from finechat.errors import ConfigError
from finechat.eval.reward_scoring import load_reward_model
from finechat.models.reward_head import reward_model_from
from finechat.train import checkpoints
from finechat.train.compact_head import compact_log_prob_head
from finechat.train.grpo_rewards import get_rewards
from finechat.train.methods import default_lora_targets, prepare_model, trainable_to_float32
from finechat.train.train_config import TrainConfig
from finechat.train.trainer_setup import split_holdout

# ------------------------------------------------------------------------------------------------------------
# settings checks
# ------------------------------------------------------------------------------------------------------------

def check_trl(cfg: TrainConfig, sft_weight: bool = False) -> None:
    """What every TRL stage refuses: P-Tuning v2, and ``sft_weight`` unless the stage has it (``sft_weight``)."""
    if cfg.adapter_method == "ptuning":
        raise ConfigError(f"stage {cfg.stage} with method ptuning: TRL's trainers need the adapter to switch off "
                          "for the reference model; use lora, qlora, full or freeze")
    if cfg.sft_weight < 0 or (cfg.sft_weight and not sft_weight):
        raise ConfigError(f"sft_weight: {cfg.sft_weight} for stage {cfg.stage}; it is the weight (0 or more) of "
                          "DPO's chosen-answer likelihood term, for stage dpo only")


def check_dpo(cfg: TrainConfig) -> None:
    check_trl(cfg, sft_weight=True)


def check_grpo(cfg: TrainConfig) -> None:
    check_trl(cfg)
    if (cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps) % cfg.num_generations:
        raise ConfigError(f"stage grpo: per_device_train_batch_size x gradient_accumulation_steps "
                          f"({cfg.per_device_train_batch_size} x {cfg.gradient_accumulation_steps}) must be a "
                          f"multiple of num_generations ({cfg.num_generations}): each prompt's answers form a group")


def two_sequences(cfg: TrainConfig) -> int:
    """A pair puts two sequences (chosen and rejected) through the model."""
    return 2


def group_of_sequences(cfg: TrainConfig) -> int:
    """GRPO's per_device_train_batch_size counts completions (num_generations per prompt), one sequence each
    (measured: the default model's GRPO peak at batch 16 is 16 sequences' worth, not 64)."""
    return 1


def cutoff_length(cfg: TrainConfig, rows: list[dict]) -> int:
    """The memory estimate's sequence length of a TRL stage: cutoff_len."""
    return cfg.cutoff_len


def _answer_sequences(rows: list[dict]) -> list[tuple[int, int]]:
    """(sequence length, answer length) of every sequence of prompt + answer rows, in any of the stages' layouts."""
    seqs = []
    for r in rows:
        prompt = len(r.get("prompt_ids") or r.get("prompt_input_ids") or [])
        for key in ("chosen_ids", "rejected_ids", "completion_ids"):  # answers after prompt_ids (rm: whole rows)
            if key in r:
                seqs.append((prompt + len(r[key]), len(r[key])))
        for key in ("chosen_input_ids", "rejected_input_ids"):  # prompt + answer already joined (orpo, simpo)
            if key in r:
                seqs.append((len(r[key]), len(r[key]) - prompt))
    return seqs


def longest_answer_row(cfg: TrainConfig, rows: list[dict]) -> int:
    """The memory estimate's sequence length of pair / labelled rows: the longest prompt + answer (a batch is
    padded to its longest row, not to cutoff_len)."""
    return min(max(s for s, _ in _answer_sequences(rows)), cfg.cutoff_len)


def answer_share(cfg: TrainConfig, rows: list[dict]) -> float:
    """The share of positions the LM head projects on a CPU (finechat's compact head: answers only), over the
    longest sequences (those that make the peak batch)."""
    seqs = sorted(_answer_sequences(rows), reverse=True)[: max(1, cfg.per_device_train_batch_size * 2)]
    return sum(a for _, a in seqs) / (len(seqs) * max(s for s, _ in seqs))


def longest_prompt_and_completion(cfg: TrainConfig, rows: list[dict]) -> int:
    """GRPO's sequence length: the longest prompt plus max_completion_length sampled tokens."""
    return max(len(r["prompt_ids"]) for r in rows) + cfg.max_completion_length


def completion_share(cfg: TrainConfig, rows: list[dict]) -> float:
    """GRPO's loss projects the completion positions only."""
    return (cfg.max_completion_length + 1) / longest_prompt_and_completion(cfg, rows)


def always_reference(cfg: TrainConfig) -> bool:
    """A reference forward pass runs beside the policy (with LoRA: the same weights, the adapter switched off)."""
    return True


def kl_reference(cfg: TrainConfig) -> bool:
    """GRPO runs a reference model only for its KL term (beta > 0)."""
    return cfg.beta > 0


# ------------------------------------------------------------------------------------------------------------
# data: readers and row adapters
# ------------------------------------------------------------------------------------------------------------

def pair_rows(rows: list[dict]) -> list[dict]:
    """Tokenized pairs in the layout TRL's ORPO / CPO ``tokenize_row`` produces (labels -100 on the prompt)."""
    out = []
    for row in rows:
        prompt = row["prompt_ids"]
        adapted = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
        for side in ("chosen", "rejected"):
            ids = prompt + row[f"{side}_ids"]
            adapted.update({f"{side}_input_ids": ids, f"{side}_attention_mask": [1] * len(ids),
                            f"{side}_labels": [IGNORE_INDEX] * len(prompt) + row[f"{side}_ids"]})
        out.append(adapted)
    return out


def sequence_rows(rows: list[dict]) -> list[dict]:
    """Tokenized pairs as two whole sequences, scored at their last token (TRL's RewardTrainer)."""
    return [{"chosen_ids": r["prompt_ids"] + r["chosen_ids"], "rejected_ids": r["prompt_ids"] + r["rejected_ids"]}
            for r in rows]


def same_rows(rows: list[dict]) -> list[dict]:
    """Rows TRL takes as read (dpo: prompt / chosen / rejected ids; kto: prompt / completion ids and label)."""
    return rows


def load_preference_data(cfg: TrainConfig, tokenizer: Any, template: Any, kind: str = "pairs"
                         ) -> tuple[list[dict], list[dict], dict]:
    """(train rows, eval rows, info) of pairs or labelled answers; bad records and no-room prompts are counted."""
    result = read_preferences(cfg.data, cfg.format, cfg.on_bad_record, kind=kind)
    if result.skipped:
        log(result.skipped_table())
    records = result.records[: cfg.max_samples or None]
    if kind == "labelled":  # KTO's trainer keeps the order (see kto_settings): shuffled here with the seed
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
    return train, held, info


def read_pairs(cfg: TrainConfig, tokenizer: Any, template: Any, cache_dir: str | None = None
               ) -> tuple[list[dict], list[dict], dict]:
    """Preference pairs (prompt, chosen, rejected) tokenized through the SFT path."""
    return load_preference_data(cfg, tokenizer, template, "pairs")


def read_labelled(cfg: TrainConfig, tokenizer: Any, template: Any, cache_dir: str | None = None
                  ) -> tuple[list[dict], list[dict], dict]:
    """Answers labelled desirable / undesirable (a pair counts as one of each), shuffled with the seed."""
    return load_preference_data(cfg, tokenizer, template, "labelled")


def read_prompts(cfg: TrainConfig, tokenizer: Any, template: Any, cache_dir: str | None = None
                 ) -> tuple[list[dict], list[dict], dict]:
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



def prepare_policy(model: Any, tokenizer: Any, cfg: TrainConfig) -> Any:
    """The base with the method applied (LoRA / P-Tuning v2 / full / freeze / QLoRA)."""
    return prepare_model(model, cfg)


def _trl(stage: str) -> Any:
    """TRL itself; a clear error when it is missing."""
    try:
        import trl
    except ImportError as e:
        raise ConfigError(f"stage {stage} needs TRL: pip install 'finechat[align]'") from e
    return trl


def dpo_classes() -> tuple[type, type]:
    """(trainer class, config class) of TRL for the stage."""
    trl = _trl("dpo")
    return trl.DPOTrainer, trl.DPOConfig


def rm_classes() -> tuple[type, type]:
    trl = _trl("rm")
    return trl.RewardTrainer, trl.RewardConfig


def kto_classes() -> tuple[type, type]:
    trl = _trl("kto")
    return trl.KTOTrainer, trl.KTOConfig


def grpo_classes() -> tuple[type, type]:
    trl = _trl("grpo")
    return trl.GRPOTrainer, trl.GRPOConfig


def orpo_classes() -> tuple[type, type]:
    _trl("orpo")
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    return ORPOTrainer, ORPOConfig


def simpo_classes() -> tuple[type, type]:
    _trl("simpo")
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    return CPOTrainer, CPOConfig


# -- each stage's TRL config fields, beyond the Trainer flags every stage shares ----------------------------
def _trl_fields(**fields: Any) -> dict:
    return {"label_names": [], **fields}  # TRL's rows carry no ``labels`` column


def dpo_settings(cfg: TrainConfig) -> dict:
    losses = {"loss_type": [cfg.loss]}
    if cfg.sft_weight:
        losses = {"loss_type": [cfg.loss, "sft"], "loss_weights": [1.0, cfg.sft_weight]}
    return _trl_fields(beta=cfg.beta, **losses, max_length=cfg.cutoff_len)


def rm_settings(cfg: TrainConfig) -> dict:
    return _trl_fields(max_length=cfg.cutoff_len)


def kto_settings(cfg: TrainConfig) -> dict:
    # KTO's KL term pairs each answer with its batch neighbour's prompt, so TRL needs a fixed order
    # (the rows are shuffled with the seed when read instead)
    return _trl_fields(beta=cfg.beta, max_length=cfg.cutoff_len, train_sampling_strategy="sequential")


def orpo_settings(cfg: TrainConfig) -> dict:
    return _trl_fields(beta=cfg.beta, max_length=cfg.cutoff_len)


def simpo_settings(cfg: TrainConfig) -> dict:
    return _trl_fields(beta=cfg.beta, loss_type="simpo", cpo_alpha=0.0, simpo_gamma=cfg.simpo_gamma,
                       max_length=cfg.cutoff_len)


def grpo_settings(cfg: TrainConfig) -> dict:
    return _trl_fields(beta=cfg.beta, num_generations=cfg.num_generations, temperature=cfg.temperature,
                       max_completion_length=cfg.max_completion_length, log_completions=False,
                       **grpo_vllm_settings(cfg))


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


# -- TRL trainers told that the rows arrive tokenized by the SFT path ----------------------------------------
# Each override skips only TRL's own tokenizing, which would re-tokenize decoded text and so could merge BPE
# tokens across the prompt / answer boundary, add BOS / EOS the template did not write, or truncate by other rules.

def dpo_rows_trainer(base: type) -> type:
    class FinechatDPOTrainer(base):
        """DPO on rows finechat tokenized with the SFT template (TRL would otherwise re-tokenize text), with
        the LM head projecting answer positions only on a CPU (:mod:`finechat.train.compact_head`)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            policy = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            # TRL has wrapped a separate reference (method full / freeze) in DeepSpeed's engine by now: the head goes on
            # the model inside. On the engine it replaced the engine's forward and ran the backbone without the root
            # module's ZeRO-3 hooks; under ZeRO-3 the head weight it read was then an empty partition (numel 0,
            # NOT_AVAILABLE): every reference log-probability -inf, DPO loss 0 and grad norm inf on every step
            reference = None if self.ref_model is None else self.accelerator.unwrap_model(self.ref_model)
            for m in (policy, reference):
                if m is not None:
                    compact_log_prob_head(m)

        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            if "prompt_ids" in dataset.column_names:
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    return FinechatDPOTrainer


def kto_rows_trainer(base: type) -> type:
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


def pair_rows_trainer(base: type) -> type:
    class FinechatPairTrainer(base):
        def tokenize_row(self, feature: dict, model: Any = None) -> dict:
            if "chosen_labels" in feature:
                return feature
            return super().tokenize_row(feature, model)

    return FinechatPairTrainer


def grpo_rows_trainer(base: type) -> type:
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


def same_trainer(base: type) -> type:
    """TRL's trainer as it is (rm: TRL's RewardTrainer takes the whole sequences' ids as they are)."""
    return base


def trl_trainer(classes: Callable[[], tuple[type, type]], takes_rows: Callable[[type], type],
                rewards: Callable[[TrainConfig], list] | None = None) -> Callable[..., Any]:
    """A stage's trainer builder: TRL's trainer (``classes``), told by ``takes_rows`` that the rows arrive
    tokenized, saving atomically like every finechat run; ``rewards``: the reward functions it is given."""

    def build(cfg: TrainConfig, model: Any, tokenizer: Any, args: Any, train: list, evals: list | None,
              callbacks: list, info: dict, licence: dict, ref_model: Any = None) -> Any:
        """``ref_model``: DPO's reference as a separate model; by default a LoRA policy is its own reference
        (TRL keeps a frozen copy of its starting adapter)."""
        from datasets import Dataset

        base = takes_rows(checkpoints.make_trainer_class(classes()[0]))
        kwargs: dict[str, Any] = dict(model=model, args=args, train_dataset=Dataset.from_list(train),
                                      eval_dataset=Dataset.from_list(evals) if evals else None,
                                      processing_class=tokenizer, callbacks=callbacks, run_info=info,
                                      keep_checkpoints=cfg.save_total_limit, extra_files={LICENCE_FILE: licence})
        if rewards is not None:
            kwargs["reward_funcs"] = rewards(cfg)
        if ref_model is not None:
            kwargs["ref_model"] = ref_model
        trainer = base(**kwargs)
        if cfg.quantization_bit:  # TRL puts a quantized model's trainable weights in bf16; finechat's rule is float32
            trainable_to_float32(trainer.model)
        return trainer

    return build


def grpo_rewards(cfg: TrainConfig) -> list:
    """The reward functions of a grpo stage (loading the reward model when one is named)."""
    rm = None
    if "reward_model" in cfg.rewards:
        if not cfg.reward_model:
            raise ConfigError("rewards: reward_model needs reward_model: DIR (a stage-rm checkpoint)")
        rm = load_reward_model(cfg.reward_model)
    return get_rewards(cfg.rewards, rm)

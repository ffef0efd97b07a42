"""One table of training stages: each ``stage:`` of ``finechat train`` is one :class:`Stage` record in
:data:`STAGES`, and the run (:func:`finechat.train.recipe.run_training`) asks the record instead of testing the
stage's name (as TRL keeps one trainer and config per method, and peft one entry per method in its registry).

A record says where the stage's parts live (:mod:`finechat.train.sft`, :mod:`finechat.train.pretrain` on
transformers' Trainer; :mod:`finechat.train.align` on TRL): its data reader and row adapter, how the method is
put on the base, its trainer, its settings (the TrainConfig fields it reads, its TRL config fields, its
checks), the metrics its trainer logs, its memory estimate, and the models it cannot train.

Adding a stage is one record here (its name also goes into ``TrainConfig.stage``'s choices, which stay
readable without importing torch) plus its tests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, get_args, get_type_hints

from finechat.errors import ConfigError
from finechat.train import align, pretrain, sft
from finechat.train.estimate import ForwardShape
from finechat.train.train_config import TrainConfig

Reader = Callable[[TrainConfig, Any, Any, "str | None"], tuple[list[dict], list[dict], dict]]
MODEL_NAMES = {"chatglm": "the native ChatGLM-6B"}  # model_type -> how errors name it


def no_check(cfg: TrainConfig) -> None:
    """A stage on transformers' Trainer takes every method and setting."""


@dataclasses.dataclass(frozen=True)
class Stage:
    """Everything finechat knows about one training stage."""

    name: str
    summary: str  # one line for help and errors
    read: Reader  # (cfg, tokenizer, template, cache_dir) -> (train rows, eval rows, data info)
    rows: Callable[[list[dict]], list[dict]]  # row adapter: read rows -> the layout its trainer takes
    prepare: Callable[[Any, Any, TrainConfig], Any]  # (base, tokenizer, cfg) -> the model that trains
    trainer: Callable[..., Any]  # (cfg, model, tokenizer, args, train, evals, callbacks, info, licence) -> trainer
    uses: tuple[str, ...]  # the TrainConfig fields only some stages read that this one reads
    settings: Callable[[TrainConfig], dict] = lambda cfg: {}  # its TrainingArguments / TRL config fields
    check: Callable[[TrainConfig], None] = no_check  # its own refusals (after the model is known)
    trl: Callable[[], tuple[type, type]] | None = None  # (TRL trainer class, TRL config class); None: transformers'
    metrics: Mapping[str, str] = dataclasses.field(default_factory=dict)  # logged key -> the summary's name
    sequences: Callable[[TrainConfig], int] = sft.one_sequence  # memory estimate: sequences per example
    estimate_length: Callable[[TrainConfig, list[dict]], int] = sft.longest_row  # memory estimate: tokens
    answer_share: Callable[[TrainConfig, list[dict]], float] = sft.all_positions  # ... positions the head projects
    with_reference: Callable[[TrainConfig], bool] = sft.no_reference  # ... a reference forward pass too
    fused_head: bool = False  # ... TRL's fused log-prob head (finechat.train.estimate.FUSED_COPIES)
    unsupported: Mapping[str, str] = dataclasses.field(default_factory=dict)  # model_type -> why it cannot train
    samples: str = "data/samples/"  # where sample data for it lives (the no-data error points there)
    eval_in_training: bool = True  # held-out rows evaluated during training (grpo: in the pipeline instead)
    policy: bool = True  # trains the chat model (rm: a scorer beside it; a pipeline goes on from before it)
    # what its data files hold, for the full pass before the model loads (finechat.train.preflight):
    # "conversations", "pairs", "labelled" (KTO) or "documents" (plain text: no such pass)
    records: str = "conversations"


PAIR_METRICS = {"rewards/accuracies": "preference accuracy", "rewards/margins": "reward margin"}
NO_CHATGLM_LOOP = "TRL's grpo trainer generates through its own loop, without ChatGLM's GLM mask and 2D positions"
# ChatGLM-6B runs the stages whose rows keep its [gMASK]<sop> between prompt and answer: its forward builds
# the GLM mask and 2D positions from the ids itself.

STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("sft", "conversations with labels on answers", sft.read_sft, align.same_rows, align.prepare_policy,
          sft.sft_trainer, uses=()),
    Stage("pretrain", "plain text, every token is a target", pretrain.read_pretrain, align.same_rows,
          align.prepare_policy, pretrain.pretrain_trainer, uses=("objective", "blank_infilling", "document_per"),
          records="documents"),
    Stage("dpo", "preference pairs, TRL's DPOTrainer", align.read_pairs, align.same_rows, align.prepare_policy,
          align.trl_trainer(align.dpo_classes, align.dpo_rows_trainer), uses=("beta", "loss", "sft_weight"),
          settings=align.dpo_settings, check=align.check_dpo, trl=align.dpo_classes, metrics=PAIR_METRICS,
          sequences=align.two_sequences, estimate_length=align.longest_answer_row, answer_share=align.answer_share,
          with_reference=align.always_reference, samples="data/samples/preference_*", records="pairs"),
    Stage("orpo", "preference pairs, TRL's ORPOTrainer", align.read_pairs, align.pair_rows, align.prepare_policy,
          align.trl_trainer(align.orpo_classes, align.pair_rows_trainer), uses=("beta",),
          settings=align.orpo_settings, check=align.check_trl, trl=align.orpo_classes, metrics=PAIR_METRICS,
          sequences=align.two_sequences, estimate_length=align.longest_answer_row, answer_share=align.answer_share,
          samples="data/samples/preference_*", records="pairs"),
    Stage("simpo", "preference pairs, TRL's CPOTrainer with loss simpo", align.read_pairs, align.pair_rows,
          align.prepare_policy, align.trl_trainer(align.simpo_classes, align.pair_rows_trainer),
          uses=("beta", "simpo_gamma"), settings=align.simpo_settings, check=align.check_trl,
          trl=align.simpo_classes, metrics=PAIR_METRICS, sequences=align.two_sequences,
          estimate_length=align.longest_answer_row, answer_share=align.answer_share,
          samples="data/samples/preference_*", records="pairs"),
    Stage("kto", "answers labelled good or bad, TRL's KTOTrainer", align.read_labelled, align.same_rows,
          align.prepare_policy, align.trl_trainer(align.kto_classes, align.kto_rows_trainer), uses=("beta",),
          settings=align.kto_settings, check=align.check_trl, trl=align.kto_classes,
          metrics={"rewards/chosen_sum": "desirable reward sum", "rewards/rejected_sum": "undesirable reward sum",
                   "kl": "kl"},
          estimate_length=align.longest_answer_row, with_reference=align.always_reference, fused_head=True,
          samples="data/samples/preference_*", records="labelled"),
    Stage("rm", "a reward model on pairs, TRL's RewardTrainer", align.read_pairs, align.sequence_rows,
          align.prepare_reward_model, align.trl_trainer(align.rm_classes, align.same_trainer), uses=(),
          settings=align.rm_settings, check=align.check_trl, trl=align.rm_classes,
          metrics={"accuracy": "pairwise accuracy", "margin": "reward margin"}, sequences=align.two_sequences,
          estimate_length=align.longest_answer_row,
          unsupported={"chatglm": "transformers has no sequence-classification class for it"},
          samples="data/samples/preference_*", policy=False, records="pairs"),
    Stage("grpo", "online RL with reward functions, TRL's GRPOTrainer", align.read_prompts, align.same_rows,
          align.prepare_policy, align.trl_trainer(align.grpo_classes, align.grpo_rows_trainer, align.grpo_rewards),
          uses=("beta", "rewards", "reward_model", "num_generations", "max_completion_length", "temperature"),
          settings=align.grpo_settings, check=align.check_grpo, trl=align.grpo_classes,
          metrics={"reward": "reward", "kl": "kl"}, sequences=align.group_of_sequences,
          estimate_length=align.longest_prompt_and_completion, answer_share=align.completion_share,
          with_reference=align.kl_reference, fused_head=True, unsupported={"chatglm": NO_CHATGLM_LOOP},
          samples="data/samples/preference_*", eval_in_training=False),
)}


def stage_names() -> tuple[str, ...]:
    """The names ``TrainConfig.stage`` accepts (its type lists them without importing this table)."""
    return get_args(get_type_hints(TrainConfig)["stage"])


def get_stage(name: str) -> Stage:
    """The record of a stage; an unknown name is refused with the valid ones."""
    try:
        return STAGES[name]
    except KeyError:
        raise ConfigError(f"unknown stage {name!r}; choose from: {', '.join(STAGES)}") from None


def check_supported(stage: Stage, cfg: TrainConfig, model: Any) -> None:
    """A clear error for a model or setting the stage cannot train with."""
    model_type = getattr(model.config, "model_type", "")
    if model_type in stage.unsupported:
        works = [s.name for s in STAGES.values() if s.trl and model_type not in s.unsupported]
        plain = [s.name for s in STAGES.values() if not s.trl and model_type not in s.unsupported]
        raise ConfigError(f"stage {stage.name} does not work with {MODEL_NAMES.get(model_type, model_type)}: "
                          f"{stage.unsupported[model_type]}; stages that work with it: {', '.join(works)} "
                          f"(and {', '.join(plain)})")
    stage.check(cfg)


def forward_shape(stage: Stage, cfg: TrainConfig, rows: list[dict]) -> ForwardShape:
    """The largest forward pass of ``stage`` over its tokenized ``rows`` (at cutoff_len without rows): what the
    memory estimate counts."""
    sequences = cfg.per_device_train_batch_size * stage.sequences(cfg)
    if not rows:
        return ForwardShape(sequences, cfg.cutoff_len, reference=stage.with_reference(cfg), source="cutoff_len",
                            fused_head=stage.fused_head)
    return ForwardShape(sequences, stage.estimate_length(cfg, rows), answer_fraction=stage.answer_share(cfg, rows),
                        reference=stage.with_reference(cfg), fused_head=stage.fused_head)

"""Train a model: SFT, pretraining, reward model, DPO and relatives, GRPO (finechat train CONFIG.yaml [key=value ...]).

Examples:
  finechat train recipes/adgen-lora.yaml
  finechat train recipes/alpaca-lora.yaml max_steps=20 output_dir=output/try
  finechat train recipes/adgen-ptuning.yaml --estimate
  torchrun --nproc_per_node 2 -m finechat train recipes/adgen-lora.yaml
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Literal, get_args, get_origin, get_type_hints

from finechat.config import add_config_arguments, config_from_args
from finechat.errors import ConfigError
from finechat.train.train_config import TrainConfig

# `finechat train --help` must answer without torch: the training modules (torch, transformers, TRL) are
# imported inside main(), and the help reads only the TrainConfig dataclass.


def field_choices(cls: type, name: str) -> tuple[Any, ...]:
    """The Literal choices of the field ``name`` of a config dataclass, searched through nested groups."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if f.name == name and get_origin(tp) is Literal:
            return get_args(tp)
        if dataclasses.is_dataclass(tp):
            found = field_choices(tp, name)
            if found:
                return found
    return ()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    stages = ", ".join(field_choices(TrainConfig, "stage"))
    parser.description = (f"{parser.description}\n\nstages (stage=NAME): {stages}; "
                          "methods (method=NAME): " + ", ".join(field_choices(TrainConfig, "method")))
    parser.epilog = __doc__.split("\n", 2)[2]
    parser.add_argument("--estimate", action="store_true",
                        help="print parameters, trainable parameters and the peak-memory estimate, then stop")
    add_config_arguments(parser, TrainConfig)


def main(args: argparse.Namespace) -> int:
    from finechat.train.recipe import run_training
    from finechat.train.stages import is_stages_file, main_stages, resolve_stages, stage_train_configs

    # `finechat train CONFIG.yaml key=value`: the first positional without '=' is the config file.
    overrides = list(args.overrides or [])
    if overrides and "=" not in overrides[0]:
        if args.config:
            raise ConfigError(f"two config files: {args.config} and {overrides[0]}")
        args.config = overrides.pop(0)
    args.overrides = overrides
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"expected key=value after the config file, got {bad[0]!r}")
    if args.config and is_stages_file(args.config):  # a multi-stage recipe (stages: [...]), see finechat.train.stages
        if not args.estimate:
            return main_stages(args.config, overrides)
        cfg, _ = resolve_stages(args.config, overrides)
        for name, stage_cfg in stage_train_configs(cfg):
            print(f"stage {name}:")
            _print_estimate(stage_cfg)
        return 0
    cfg = config_from_args(TrainConfig, args)
    if args.estimate:
        _print_estimate(cfg)
        return 0
    result = run_training(cfg)  # sft / pretrain on the Trainer; dpo, rm, kto, orpo, simpo, grpo on TRL
    print(result.final_checkpoint or result.output_dir)
    return 0


def _print_estimate(cfg: TrainConfig) -> None:
    from finechat.train.estimate import estimate_without_weights
    from finechat.train.stage_table import get_stage

    # a preference pair is two sequences (chosen and rejected); GRPO samples num_generations per prompt
    batch = cfg.per_device_train_batch_size * get_stage(cfg.stage).sequences(cfg)
    est = estimate_without_weights(dataclasses.replace(cfg, per_device_train_batch_size=batch))
    print(f"{cfg.method} on {cfg.model}, batch {cfg.per_device_train_batch_size} x {cfg.cutoff_len} tokens, "
          f"{'bf16' if cfg.bf16 else 'fp16' if cfg.fp16 else 'fp32'}"
          f"{', gradient checkpointing' if cfg.gradient_checkpointing else ''}")
    print(est.table())

"""Train a model: SFT, pretraining, reward model, DPO and relatives, GRPO (finechat train CONFIG.yaml [key=value ...]).

Examples:
  finechat train recipes/adgen-lora.yaml
  finechat train recipes/alpaca-lora.yaml max_steps=20 output_dir=output/try
  finechat train recipes/adgen-ptuning.yaml --estimate
  finechat train recipes/adgen-lora.yaml --nproc-per-node 2 distributed.strategy=fsdp2
  finechat train recipes/distributed/fsdp2-full.yaml --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --master-port 29500
  torchrun --nproc_per_node 2 -m finechat train recipes/adgen-lora.yaml
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from finechat.config import add_config_arguments, config_from_args
from finechat.console import log
from finechat.errors import ConfigError, FinechatError
from finechat.train.distributed import (
    Launch,
    check_launch,
    check_strategy,
    is_main_process,
    launch_command,
    launch_env,
    leave_process_group,
    model_type_of,
    report_rank_failure,
    stale_build_locks,
    world,
)
from finechat.train.train_config import TrainConfig

RUNS_MODEL = True  # runs under models.device.cpu_threads (see finechat.cli)

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
    launch = parser.add_argument_group("several processes or machines (re-executed through torchrun)")
    launch.add_argument("--nproc-per-node", "--nproc_per_node", type=int, default=1, metavar="N",
                        help="training processes on this machine (torchrun's flag)")
    launch.add_argument("--nnodes", type=int, default=1, metavar="N", help="machines taking part (torchrun's flag)")
    launch.add_argument("--node-rank", "--node_rank", type=int, default=0, metavar="I",
                        help="this machine's index, 0 on the machine that hosts the rendezvous")
    launch.add_argument("--master-addr", "--master_addr", metavar="HOST", help="address of node 0")
    launch.add_argument("--master-port", "--master_port", type=int, metavar="PORT",
                        help="port of node 0's rendezvous (default: a free port on one machine)")
    # the `deepspeed` launcher passes --local_rank to every process; LOCAL_RANK in the environment says the same
    launch.add_argument("--local-rank", "--local_rank", type=int, help=argparse.SUPPRESS)
    add_config_arguments(parser, TrainConfig)


def main(args: argparse.Namespace) -> int:
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
    if not cfg.data and not args.estimate:
        raise ConfigError(_nothing_to_train(args.config))
    if args.estimate:
        _print_estimate(cfg, processes=args.nproc_per_node * args.nnodes)
        return 0
    from finechat.train.preflight import check_before_loading, check_records

    check_before_loading(cfg, args.config)  # output folder and the recipe's columns, before the model loads
    from finechat.train.stage_table import get_stage  # (imports torch: after the quick checks above)

    check_records(cfg, get_stage(cfg.stage).records)  # every record of the data files, before the model loads
    launch = Launch(args.nproc_per_node, args.nnodes, args.node_rank, args.master_addr, args.master_port)
    if launch.wanted():
        return _relaunch(cfg, launch, args)
    from finechat.train.recipe import run_training

    try:
        result = run_training(cfg)  # sft / pretrain on the Trainer; dpo, rm, kto, orpo, simpo, grpo on TRL
    except FinechatError:
        raise  # one line naming the rank (finechat.cli)
    except Exception as e:  # one rank of several: its own error once, or one line if another rank failed first
        if world()[2] == 1:
            raise
        return report_rank_failure(e)
    leave_process_group()
    if is_main_process():
        print(result.final_checkpoint or result.output_dir)
    return 0


def _nothing_to_train(config: str | None) -> str:
    """What to type when no training data is set (a bare ``finechat train``, or a config without ``data:``)."""
    if config:
        return (f"{config} sets no training data: add data: [FILE, ...] to it, or give it on the command line: "
                f"finechat train {config} data=[FILE] (formats and samples: data/samples/)")
    recipes = sorted(p.name for p in Path("recipes").glob("*.yaml")) if Path("recipes").is_dir() else []
    shipped = f" (recipes here: {', '.join(recipes[:6])})" if recipes else ""
    return ("nothing to train: start from a recipe, e.g. finechat train recipes/adgen-lora.yaml, or name your data: "
            f"finechat train data=[FILE] method=lora (formats and samples: data/samples/){shipped}")


def _print_estimate(cfg: TrainConfig, processes: int = 1) -> None:
    from finechat.train.estimate import estimate_without_weights
    from finechat.train.sizing import forward_shape

    # the largest forward pass: a preference pair is two sequences, GRPO's batch counts completions, and a batch is
    # padded to its longest row (read from the data, tokenized as the run will)
    shape = forward_shape(cfg)
    est = estimate_without_weights(dataclasses.replace(cfg, per_device_train_batch_size=shape.sequences),
                                   seq_len=shape.seq_len, processes=processes,
                                   answer_fraction=shape.answer_fraction, reference=shape.reference,
                                   fused_head=shape.fused_head)
    longest = "the longest row in the data" if shape.source == "data" else "cutoff_len"
    print(f"{cfg.stage} {cfg.method} on {cfg.model}, batch {cfg.per_device_train_batch_size} "
          f"({shape.sequences} sequences) x {shape.seq_len} tokens ({longest}), "
          f"{'bf16' if cfg.bf16 else 'fp16' if cfg.fp16 else 'fp32'}"
          f"{', gradient checkpointing' if cfg.gradient_checkpointing else ''}")
    print(est.table())


def _relaunch(cfg: TrainConfig, launch: Launch, args: argparse.Namespace) -> int:
    """Run this same command on every rank through ``python -m torch.distributed.run`` (torchrun)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("--nproc-per-node / --nnodes given inside a launched run (WORLD_SIZE is set): start "
                          "finechat train either with these flags or under torchrun / accelerate launch, not both")
    check_strategy(cfg, model_type_of(cfg.model))  # refused here, before any process starts
    launch = check_launch(launch, wait_for_master=cfg.distributed.master_wait)
    if cfg.distributed.strategy in ("zero2", "zero3"):
        for lock in stale_build_locks():
            log(f"warning: DeepSpeed's op build lock {lock} exists: another run is compiling the op, or one was "
                "killed while compiling it; if no compiler runs, delete that file, or the ranks wait for it forever")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    typed = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in vars(args).items() if k in names]
    finechat_args = ([args.config] if args.config else []) + typed + list(args.overrides)
    return subprocess.call(launch_command(launch, finechat_args), env=launch_env(cfg))

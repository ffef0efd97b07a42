"""Training on several processes or machines: the ``distributed:`` config group, launch and rank helpers.

finechat owns no cluster layer (docs/architecture.md). What is here:

- :class:`DistributedConfig`, the ``distributed:`` group of a training config: which of the field's strategies
  carries the run (``ddp``, ``fsdp2``, ``zero2``, ``zero3``) and its options;
- :func:`trainer_arguments`: the strategy as transformers' ``TrainingArguments`` (``fsdp`` + ``fsdp_config``
  with ``version: 2`` for accelerate's FSDP plugin, a ``deepspeed`` config dict for ZeRO); the Trainer,
  accelerate and DeepSpeed do the sharding;
- :func:`check_strategy`: a combination the engine cannot carry, refused by name before anything starts;
- :func:`launch_command`: ``finechat train ... --nproc-per-node N`` re-executed through
  ``python -m torch.distributed.run`` (torchrun), with the bad-input checks (port in use, unreachable master)
  done before any process starts;
- rank helpers read the environment every launcher sets (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``: torchrun,
  ``accelerate launch`` and ``deepspeed`` all export them).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

from finechat.config import field
from finechat.errors import ConfigError

STRATEGIES = ("ddp", "fsdp2", "zero2", "zero3")
RENDEZVOUS_ID = "finechat"


@dataclasses.dataclass
class DistributedConfig:
    """How a run started on several processes shares the work (one process ignores it)."""

    strategy: Literal["ddp", "fsdp2", "zero2", "zero3"] = field(
        "ddp", help="ddp: every rank holds the whole model; fsdp2: PyTorch FSDP2 full shard of weights, gradients "
        "and optimizer state (accelerate's FSDP plugin); zero2: DeepSpeed ZeRO-2 (gradients and optimizer state "
        "sharded); zero3: DeepSpeed ZeRO-3 (weights too)"
    )
    cpu_offload: bool = field(False, help="fsdp2: keep sharded weights, gradients and optimizer state in CPU memory; "
                              "zero2 / zero3: offload the optimizer state (zero3: and the weights) to the CPU")
    backend: str | None = field(None, help="torch.distributed backend; default gloo on CPU, nccl on CUDA")
    timeout: int = field(300, help="seconds a rank waits in a collective before giving up (a crashed rank stops "
                         "the others within this time)")
    master_wait: int = field(30, help="--node-rank > 0: seconds to wait for node 0's rendezvous before giving up")

    def __post_init__(self) -> None:
        if self.master_wait < 0:
            raise ValueError(f"distributed.master_wait must be >= 0 seconds, got {self.master_wait}")
        if self.timeout < 1:
            raise ValueError(f"distributed.timeout must be >= 1 second, got {self.timeout}")
        if self.cpu_offload and self.strategy == "ddp":
            raise ValueError("distributed.cpu_offload needs strategy fsdp2, zero2 or zero3 (ddp keeps the whole "
                             "model on every rank)")


# ------------------------------------------------------------------------------------------------------------
# ranks
# ------------------------------------------------------------------------------------------------------------

def world() -> tuple[int, int, int]:
    """(rank, local rank, world size) from the launcher's environment (torchrun, accelerate, deepspeed)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def leave_process_group() -> None:
    """After a finished run, wait for every rank and leave the process group. A rank that exits with its
    communication threads (gloo, DeepSpeed) still running can abort at exit ("terminate called without an
    active exception", SIGABRT), failing a run that trained and saved. Not called after an error: a barrier
    would wait for a rank that is gone (torchrun stops the others)."""
    import torch.distributed as torch_dist

    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


PEER_LOST_EXIT = 75  # a rank that only lost a peer (EX_TEMPFAIL); finechat.train.launcher never names it first
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Socket closed",
             "NCCL communicator was aborted")


def report_rank_failure(error: BaseException, command: str = "train") -> int:
    """What a rank of a run on several processes says when an exception ends it; returns the exit code (1).

    A rank that lost another one in a collective (gloo: "Connection closed by peer") is not where the error is:
    it says so in one line, so that the failing rank's error is the only traceback the user reads, and it ends
    at once with :data:`PEER_LOST_EXIT`. At once (``os._exit``): its process group is broken, and a normal exit
    with gloo's threads still running aborts (SIGABRT, "terminate called without an active exception"), which
    torchrun would report as the first failure. Any other exception is that rank's own: its traceback, under a
    line naming the rank. torchrun then stops every rank and finechat.train.launcher names the one that failed
    first, passing over the ranks that only lost a peer (torchrun's timestamps are whole seconds: both ranks
    often fail in the same one).
    """
    import traceback

    rank = world()[0]
    if _is_peer_lost(error):
        first = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        first = re.sub(r"^\[[^\]]*\]\s*", "", first)  # gloo's "[.../pair.cc:553] " source location
        print(f"finechat {command} (rank {rank}): stopped: a collective failed, another rank has probably left the "
              f"run ({first[:160]})", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(PEER_LOST_EXIT)
    else:
        print(f"finechat {command} (rank {rank}) failed:", file=sys.stderr)
        traceback.print_exception(error, file=sys.stderr)
    sys.stderr.flush()
    return 1


def _is_peer_lost(error: BaseException) -> bool:
    try:
        from torch.distributed import DistError
    except ImportError:  # pragma: no cover - torch without distributed
        DistError = ()  # noqa: N806
    if isinstance(error, DistError):
        return True
    return isinstance(error, RuntimeError) and any(marker in str(error) for marker in PEER_LOST)


def is_main_process() -> bool:
    """Rank 0: the one process that writes reports, plots, run info and logs progress."""
    return world()[0] == 0


# ------------------------------------------------------------------------------------------------------------
# strategy -> TrainingArguments
# ------------------------------------------------------------------------------------------------------------

def check_strategy(cfg: Any, model_type: str | None = None) -> None:
    """Refuse what the strategy cannot carry (before any model loads); ``cfg`` is a TrainConfig. ``model_type``
    (config.json's) names the native ChatGLM-6B, whose own INT4/INT8 layers FSDP2 cannot save."""
    dist: DistributedConfig = cfg.distributed
    sharded = dist.strategy in ("fsdp2", "zero2", "zero3")
    if sharded and (cfg.fsdp or cfg.fsdp_config or cfg.deepspeed):
        raise ConfigError(f"distributed.strategy {dist.strategy} writes the Trainer's fsdp / deepspeed settings "
                          "itself; leave fsdp, fsdp_config and deepspeed unset (or use strategy ddp with your own)")
    if dist.strategy == "fsdp2" and cfg.adapter_method == "ptuning" and cfg.quantization_bit and model_type == "chatglm":
        raise ConfigError("distributed.strategy fsdp2 cannot shard the native ChatGLM-6B's INT4/INT8 layers (P-Tuning v2 "
                          "on a quantized ChatGLM): saving a checkpoint fails on the sharded packed weight (torch: "
                          "\"Cannot unflatten unevenly sharded tensor\"); use ddp")
    if dist.strategy == "fsdp2" and cfg.quantization_bit == 8:
        raise ConfigError("distributed.strategy fsdp2 cannot shard an 8-bit bitsandbytes base: FSDP2 turns its Int8Params "
                          "into plain parameters (bitsandbytes: \"'Parameter' object has no attribute 'CB'\"); use "
                          "quantization_bit 4 (FSDP + QLoRA), or ddp / zero2 / zero3")
    if dist.strategy in ("zero2", "zero3"):
        try:
            import importlib.util

            found = importlib.util.find_spec("deepspeed") is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise ConfigError(f"distributed.strategy {dist.strategy} needs DeepSpeed: pip install 'finechat[dist]'")


def fsdp_config(dist: DistributedConfig) -> dict:
    """accelerate's FSDP plugin settings (through TrainingArguments.fsdp_config) for FSDP2 full sharding."""
    return {
        "version": 2,
        "reshard_after_forward": True,  # full shard: weights gathered per layer, freed after its forward
        "cpu_offload": dist.cpu_offload,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # one FSDP unit per decoder layer (_no_split_modules)
        "state_dict_type": "SHARDED_STATE_DICT",  # each rank saves its own shard (torch.distributed.checkpoint)
        "cpu_ram_efficient_loading": False,
    }


def deepspeed_config(dist: DistributedConfig, cfg: Any) -> dict:
    """A DeepSpeed config for ZeRO-2/3; "auto" values are filled in by transformers from the Trainer flags."""
    zero_level = 2 if dist.strategy == "zero2" else 3
    zero: dict[str, Any] = {"stage": zero_level, "overlap_comm": False, "contiguous_gradients": True}
    if dist.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if zero_level == 3:
            zero["offload_param"] = {"device": "cpu"}
    if zero_level == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # save_model writes a plain HF folder
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": zero,
        # torch's own AdamW: DeepSpeed's fused CPU Adam needs a compiler at run time
        "optimizer": {"type": "AdamW", "params": {"torch_adam": True, "lr": "auto", "betas": "auto", "eps": "auto",
                                                   "weight_decay": "auto"}},
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
    }


def trainer_arguments(cfg: Any, device: str) -> dict:
    """TrainingArguments settings for ``cfg.distributed`` (an empty dict on one process with ddp)."""
    dist: DistributedConfig = cfg.distributed
    settings: dict[str, Any] = {"ddp_timeout": dist.timeout}
    backend = dist.backend or cfg.ddp_backend or ("gloo" if device == "cpu" and world()[2] > 1 else None)
    if backend:
        settings["ddp_backend"] = backend
    if world()[2] == 1:
        return settings  # one process: nothing to shard (the Trainer refuses FSDP there)
    if dist.strategy == "fsdp2":
        settings.update(fsdp=True, fsdp_config=fsdp_config(dist))  # full shard: reshard_after_forward
    elif dist.strategy in ("zero2", "zero3"):
        if device == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # this process is one rank of a run, nothing else
        settings["deepspeed"] = deepspeed_config(dist, cfg)
    return settings


def enable_fsdp_on_cpu(trainer: Any) -> None:
    """Give a Trainer on CPU ranks the FSDP plugin its arguments asked for.

    accelerate 1.16 turns an FSDP plugin into ``DistributedType.FSDP`` only for accelerator devices (its
    ``AcceleratorState`` lists MULTI_GPU, MULTI_XPU, ...): on MULTI_CPU the plugin is dropped without a word and
    the model is wrapped in DDP. PyTorch's FSDP2 (``fully_shard``) itself runs on CPUs with gloo (its own tests
    do), and so does accelerate's FSDP2 preparation once the state says FSDP; this sets the two fields
    accelerate would have set, after the Trainer built its Accelerator, so every later step (wrapping,
    optimizer, sharded saving and loading) is accelerate's own. ``cpu_offload`` becomes FSDP2's
    ``CPUOffloadPolicy(pin_memory=False)``: the same offload path (shards, gradients and the optimizer step in CPU
    memory), without the page-locking that needs an accelerator.
    """
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import CPUOffloadPolicy

    plugin_args = getattr(trainer.args, "fsdp_plugin_args", None)
    state = trainer.accelerator.state
    if not plugin_args or state.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin(**plugin_args)
    if isinstance(plugin.cpu_offload, CPUOffloadPolicy) and plugin.cpu_offload.pin_memory:
        # accelerate's CPUOffloadPolicy() pins the shards' memory, which needs an accelerator ("Cannot access
        # accelerator device when none is available"); on CPU ranks the shards already sit in CPU memory
        plugin.cpu_offload = CPUOffloadPolicy(pin_memory=False)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


def keep_fsdp_on_cpu(trainer: Any) -> None:
    """Set ``DistributedType.FSDP`` again, just before the Trainer prepares its model, where it was undone.

    accelerate keeps the distributed type twice, in ``PartialState``'s shared state and in ``AcceleratorState``'s,
    and every ``AcceleratorState()`` built later copies the first over the second. ``enable_fsdp_on_cpu`` writes
    only the second: ``PartialState`` stays MULTI_CPU, so that its barriers and RNG synchronisation keep their
    gloo/CPU form. Anything that builds an ``AcceleratorState()`` between the Trainer's ``__init__`` and its
    ``accelerator.prepare`` therefore turns the type back to MULTI_CPU while the plugin (and ``is_fsdp_enabled``)
    stays: TRL's ``GRPOTrainer.__init__`` does, through ``accelerate.utils.set_seed(seed, device_specific=True)``.
    ``prepare`` then wraps the model in DDP and transformers, seeing FSDP enabled, makes that wrapper
    ``trainer.model`` (TRL: "'DistributedDataParallel' object has no attribute 'is_gradient_checkpointing'").
    Called from the Trainer's ``_prepare_for_training``; a no-op unless ``enable_fsdp_on_cpu`` turned FSDP on.
    """
    from accelerate.utils import DistributedType

    state = trainer.accelerator.state
    if (getattr(trainer, "is_fsdp_enabled", False) and getattr(state, "fsdp_plugin", None) is not None
            and state.distributed_type == DistributedType.MULTI_CPU):
        state.distributed_type = DistributedType.FSDP


def _local_bytes(t: Any) -> int:
    """Bytes this rank holds of a tensor: its FSDP2 shard (DTensor), its ZeRO-3 partition, or all of it."""
    if hasattr(t, "ds_tensor"):
        t = t.ds_tensor
    if hasattr(t, "to_local"):
        t = t.to_local()
    return t.numel() * t.element_size()


def model_state_bytes(model: Any, optimizer: Any) -> dict:
    """Weights, gradients (one per trainable weight, as during a step) and optimizer state held by this rank."""
    import torch

    params = list(model.parameters())
    own = {id(p) for p in params}
    weights = sum(_local_bytes(p) for p in params)
    grads = sum(_local_bytes(p) for p in params if p.requires_grad)
    inner = optimizer
    while hasattr(inner, "optimizer"):  # accelerate's and DeepSpeed's wrappers around the torch optimizer
        inner = inner.optimizer
    states = 0
    for group in getattr(inner, "param_groups", []):
        for p in group["params"]:
            if id(p) not in own:  # ZeRO's float32 partitions are copies of the weights
                states += _local_bytes(p)
            states += sum(_local_bytes(v) for v in inner.state.get(p, {}).values()
                          if torch.is_tensor(v) and v.dim() > 0)
    return {"weights": weights, "gradients": grads, "optimizer": states}


def memory_per_rank(model: Any, optimizer: Any) -> dict:
    """Every rank's peak resident memory and model-state bytes (MiB), gathered on all ranks (a collective)."""
    import resource

    import torch

    mine = {"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux reports KiB
            **model_state_bytes(model, optimizer)}
    ranks = [mine]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        ranks = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(ranks, mine)
    mib = 2**20
    return {"peak_rss_mib_per_rank": [round(r["peak_rss"] / mib, 1) for r in ranks],
            "model_state_mib_per_rank": [round((r["weights"] + r["gradients"] + r["optimizer"]) / mib, 1)
                                         for r in ranks]}


# ------------------------------------------------------------------------------------------------------------
# launch
# ------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Launch:
    """The launch flags of ``finechat train`` (torchrun's own names and meanings)."""

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None

    def wanted(self) -> bool:
        return self.nproc_per_node > 1 or self.nnodes > 1


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _reachable(host: str, port: int, wait: float) -> bool:
    deadline = time.monotonic() + wait
    while True:
        try:
            with socket.create_connection((host, port), timeout=2):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.5)


STORE_PROBE = ("import datetime, sys, torch.distributed as d; d.TCPStore(sys.argv[1], int(sys.argv[2]), is_master=False, "
               "wait_for_workers=False, timeout=datetime.timedelta(seconds=float(sys.argv[3])))")


def _is_rendezvous_store(host: str, port: int, handshake: float = 5.0, limit: float = 45.0) -> bool:
    """Whether what answers at host:port is torch's c10d store (node 0's rendezvous), by torch's own handshake.

    A TCP connection alone is not enough: another service on that port (or a proxy that accepts every
    connection) would let torchrun start, print a C++ stack for each of its retries and end a minute later
    in a traceback; against a server that waits for the client to speak first it may never end. So a child
    process, killed after ``limit`` seconds, opens a store client as torchrun would.
    """
    env = {**os.environ, "TORCH_CPP_LOG_LEVEL": "ERROR"}
    try:
        done = subprocess.run([sys.executable, "-c", STORE_PROBE, host, str(port), str(handshake)], env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


def check_launch(launch: Launch, wait_for_master: float = 30.0) -> Launch:
    """Bad launch input as one ConfigError, before any process starts; returns the launch with a port chosen."""
    if launch.nproc_per_node < 1 or launch.nnodes < 1:
        raise ConfigError(f"--nproc-per-node and --nnodes must be >= 1, got {launch.nproc_per_node} and "
                          f"{launch.nnodes}")
    if not 0 <= launch.node_rank < launch.nnodes:
        raise ConfigError(f"--node-rank {launch.node_rank} is not in 0..{launch.nnodes - 1} (--nnodes {launch.nnodes})")
    if launch.master_port is not None and not 0 < launch.master_port < 65536:
        raise ConfigError(f"--master-port {launch.master_port} is not a TCP port (1-65535)")
    if launch.nnodes > 1 and (not launch.master_addr or launch.master_port is None):
        raise ConfigError(f"--nnodes {launch.nnodes} needs --master-addr and --master-port (the address of node 0, "
                          "where the rendezvous runs)")
    host = launch.master_addr or "127.0.0.1"
    try:
        socket.getaddrinfo(host, None)
    except OSError as e:
        raise ConfigError(f"--master-addr {host}: cannot resolve it ({e.strerror or e})") from e
    if launch.node_rank == 0:
        port = launch.master_port if launch.master_port is not None else free_port(host)
        bind_host = host if launch.nnodes == 1 else "0.0.0.0"  # other nodes connect to it from outside
        if _port_in_use(bind_host, port):
            raise ConfigError(f"--master-port {port}: the port is in use on {host}; pick another one")
        return dataclasses.replace(launch, master_addr=host, master_port=port)
    assert launch.master_port is not None
    if not _reachable(host, launch.master_port, wait_for_master):
        raise ConfigError(f"--master-addr {host}:{launch.master_port}: no rendezvous answers there after "
                          f"{wait_for_master:.0f} s; start node 0 first and check the address and firewall")
    if not _is_rendezvous_store(host, launch.master_port):
        raise ConfigError(f"--master-addr {host}:{launch.master_port}: something answers there, but not torch's "
                          "rendezvous (node 0's c10d store); check that --master-port is the one node 0 was started "
                          "with")
    return launch


def launch_command(launch: Launch, finechat_args: list[str], python: str | None = None) -> list[str]:
    """``python -m finechat.train.launcher ... -m finechat train ARGS`` (torchrun) for a checked ``launch``."""
    # torchrun with a one-line ending when a rank fails (finechat.train.launcher)
    cmd = [python or sys.executable, "-m", "finechat.train.launcher", "--nproc-per-node", str(launch.nproc_per_node),
           "--max-restarts", "0"]
    if launch.nnodes == 1:
        cmd += ["--nnodes", "1", "--master-addr", str(launch.master_addr), "--master-port", str(launch.master_port)]
    else:  # torchrun's c10d rendezvous, hosted by node 0
        cmd += ["--nnodes", str(launch.nnodes), "--node-rank", str(launch.node_rank), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"{launch.master_addr}:{launch.master_port}", "--rdzv-id", RENDEZVOUS_ID,
                "--rdzv-conf", f"is_host={1 if launch.node_rank == 0 else 0}"]
    return [*cmd, "-m", "finechat", "train", *finechat_args]


def stale_build_locks() -> list[str]:
    """torch's JIT build locks for DeepSpeed's ops (``TORCH_EXTENSIONS_DIR`` or ~/.cache/torch_extensions).

    The first ZeRO run on a CPU compiles DeepSpeed's shared-memory op; the compiling rank holds a ``lock`` file
    and the other ranks wait for it to go. A run killed while compiling leaves the file behind, and every later
    run then waits forever in ``torch.utils.file_baton`` (no timeout). Said before launch, with what to do."""
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    return [f"{lock} (since {time.strftime('%H:%M', time.localtime(lock.stat().st_mtime))})"
            for lock in sorted(root.glob("*/deepspeed*/lock")) + sorted(root.glob("deepspeed*/lock"))]


def launch_env(cfg: Any) -> dict:
    """The environment of the ranks: one OpenMP thread each unless the user chose, DeepSpeed's CPU accelerator."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    if cfg.distributed.strategy in ("zero2", "zero3") and not _has_cuda():
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def model_type_of(model: str) -> str | None:
    """model_type from a model folder's config.json, read without loading anything."""
    config = Path(model).expanduser() / "config.json"
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type") if config.is_file() else None
    except (OSError, ValueError):
        return None

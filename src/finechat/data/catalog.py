"""Registry of well-known data sets and base models with their licences, and the commercial-use check.

Every training run records the licences of its base model and data (``write_licence_summary``) and, with
``commercial: true``, refuses anything non-commercial or of unknown licence (``check_commercial``). Entries
say where users get an item in words only: finechat never downloads data or weights.

Licence facts are as the projects state them in their own READMEs / model and data cards; "unknown" means
the source states none. This is not legal advice: the summary says so.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from finechat.errors import ConfigError
from finechat.files import write_json_atomic

LICENCE_FILE = "finechat_licenses.json"
RUN_FILE = "finechat_run.json"  # written by training runs (finechat.train), with a "licenses" summary
DISCLAIMER = "Licence facts as stated by each project; check the original terms before any use (not legal advice)."


@dataclasses.dataclass(frozen=True)
class Entry:
    """A known data set or model: licence, whether commercial use is allowed (None: unknown), where to get it."""

    name: str
    kind: str  # "dataset" or "model"
    license: str
    commercial: bool | None
    where: str
    format: str = ""  # data format name (finechat.data.formats), or model family
    fields: str = ""
    note: str = ""
    source: str = ""  # where the licence (and layout) was read, for entries checked that way

    @property
    def commercial_text(self) -> str:
        return {True: "yes", False: "no", None: "unknown"}[self.commercial]


def _d(name: str, fmt: str, license: str, commercial: bool | None, where: str, fields: str, note: str = "",
       source: str = "") -> Entry:
    return Entry(name, "dataset", license, commercial, where, fmt, fields, note, source)


def _m(name: str, family: str, license: str, commercial: bool | None, where: str, note: str = "") -> Entry:
    return Entry(name, "model", license, commercial, where, family, "", note)


DATASETS: dict[str, Entry] = {e.name: e for e in [
    _d("alpaca", "alpaca", "CC BY-NC 4.0", False, "Stanford Alpaca repository: alpaca_data.json (52K)",
       "instruction, input, output", "generated with text-davinci-003; OpenAI terms also apply"),
    _d("alpaca-zh", "alpaca", "CC BY-NC 4.0", False,
       "Chinese Alpaca translations, e.g. alpaca_gpt4_data_zh.json from the GPT-4-LLM project",
       "instruction, input, output", "generated with GPT-4/ChatGPT; research use only"),
    _d("adgen", "prompt-response", "unknown", None,
       "AdvertiseGen (Shao et al. 2019), as used by ChatGLM-6B's ptuning example: AdvertiseGen/train.json",
       "content (attribute string), summary (advertising copy)"),
    _d("dolly-15k", "dolly", "CC BY-SA 3.0", True, "databricks-dolly-15k.jsonl from Databricks' dolly project",
       "instruction, context, response, category"),
    _d("coig", "alpaca", "Apache-2.0", True, "BAAI COIG (Chinese Open Instruction Generalist) release",
       "instruction, input, output (per subset; convert to alpaca)", "subsets come from varied sources"),
    _d("belle", "alpaca", "GPL-3.0 + research-only terms", False,
       "BELLE project data releases, e.g. train_0.5M_CN / train_2M_CN",
       "instruction, input, output", "the BELLE terms allow research use only"),
    _d("moss-003-sft", "moss", "CC BY-NC 4.0", False, "MOSS project: moss-003-sft-data",
       "meta_instruction, chat.turn_N.{Human, MOSS}"),
    _d("moss-003-sft-plugin", "moss", "CC BY-NC 4.0", False, "MOSS project: moss-003-sft-plugin-data",
       "meta_instruction, chat.turn_N.{Human, Inner Thoughts, Commands, Tool Responses, MOSS}"),
    _d("genmedgpt-5k", "chatdoctor", "unknown", None, "ChatDoctor project: GenMedGPT-5k",
       "instruction, input, output", "ChatDoctor says its release is for academic research only"),
    _d("healthcaremagic-100k", "chatdoctor", "unknown", None, "ChatDoctor project: HealthCareMagic-100k",
       "instruction, input, output", "real patient-doctor dialogues from an online service; research only"),
    _d("icliniq", "chatdoctor", "unknown", None, "ChatDoctor project: iCliniq dialogues",
       "instruction, input, output", "research only"),
    _d("huatuo-cmekg", "huatuo", "unknown", None,
       "Huatuo-Llama-Med-Chinese project: instruction data built from the CMeKG knowledge graph",
       "instruction, input, output"),
    _d("redpajama-1t", "pretraining text", "mixed (each source's own terms)", None,
       "Together's RedPajama-Data-1T", "text, meta",
       "Common Crawl, C4, GitHub, arXiv, Books, Wikipedia, StackExchange each keep their own licence"),
    _d("hh-rlhf", "pref-prompt", "MIT", True, "Anthropic's hh-rlhf release (Bai et al. 2022), helpful-* and harmless-*",
       "chosen, rejected (whole '\\n\\nHuman: ... \\n\\nAssistant: ...' dialogues)",
       "its README says the red-team transcripts are not meant for training assistants; offensive text"),
    _d("ultrafeedback", "pref-prompt", "MIT", True, "OpenBMB's UltraFeedback (Cui et al. 2023)",
       "instruction, completions[{model, response, annotations}]; convert to prompt, chosen, rejected",
       "completions come from many models and GPT-4 rated them: those providers' terms may also apply"),
    _d("ultrafeedback-binarized", "pref-prompt", "MIT", True,
       "HuggingFaceH4's ultrafeedback_binarized (the data of Zephyr-7B-beta), split train_prefs / test_prefs",
       "prompt, chosen [messages], rejected [messages], score_chosen, score_rejected",
       "built from UltraFeedback; the same model-provider note applies"),
    # Chinese (and Chinese + English) preference sets; data/samples/published/ holds one record layout of each.
    _d("dpo-en-zh-20k", "pref-sharegpt", "Apache-2.0", True,
       "hiyouga's DPO-En-Zh-20k (also published as llamafactory's), files dpo_zh.json and dpo_en.json",
       "conversations [{from, value}], chosen {from, value}, rejected {from, value}",
       "10K Chinese + 10K English pairs drawn from other public preference sets (the list is on the card of its "
       "copy DPO-En-Zh-20k-Preference: argilla's capybara / orca / ultrafeedback DPO sets and Chinese-dpo-pairs); "
       "their terms may also apply",
       "licence: the dataset card's metadata (license: apache-2.0); layout: LLaMA-Factory's data/dataset_info.json "
       "(dpo_mix_zh / dpo_mix_en: sharegpt formatting, columns conversations, chosen, rejected)"),
    _d("dpo-en-zh-20k-preference", "pref-alpaca", "Apache-2.0", True,
       "shibing624's DPO-En-Zh-20k-Preference (MedicalGPT's layout of DPO-En-Zh-20k), dpo_zh.jsonl and dpo_en.jsonl",
       "system, history [[query, answer]], question, response_chosen, response_rejected",
       "the same pairs as dpo-en-zh-20k; its card lists the sources (argilla's capybara, orca and ultrafeedback DPO "
       "sets, wenbopan's Chinese-dpo-pairs), whose terms may also apply",
       "licence and fields: the dataset card's metadata (license: apache-2.0, dataset_info features)"),
    _d("chinese-dpo-pairs", "pref-prompt", "MIT", True, "wenbopan's Chinese-dpo-pairs (10K pairs, parquet: "
       "read as it is)", "prompt, system, chosen, rejected (strings), source, id",
       "GPT-3.5 translations of ultrafeedback-binarized-preferences-cleaned, Intel's orca_dpo_pairs and truthy-dpo "
       "(as its card says): OpenAI's terms and those sets' terms may also apply",
       "licence and fields: the dataset card (license: mit; features prompt, system, chosen, rejected)"),
    _d("medical-reward-zh", "pref-alpaca", "Apache-2.0", True,
       "shibing624's medical data set, folder reward/ (train.json: 4,000 pairs; valid.json, test.json)",
       "question, response_chosen, response_rejected (one JSON object a line)",
       "questions and chosen (doctors') answers from Toyhom's Chinese-medical-dialogue-data (MIT, its LICENSE "
       "file); the rejected answers are a model's (a copy of the set names Huatuo-Llama-Med-Chinese, LLaMA-based). "
       "Medical text: not medical advice",
       "licence: the dataset card (license: apache-2.0, 'available under the Apache 2.0'); fields: its README"),
    _d("rlhf-reward-single-round-zh", "pref-prompt", "unknown", None,
       "beyond's rlhf-reward-single-round-trans_chinese (Chinese translation of single-round HH-RLHF pairs, parquet)",
       "prompt, chosen, rejected (strings)",
       "the card states no licence; the English original (hh-rlhf) is MIT",
       "the dataset card: features prompt, chosen, rejected and no license field"),
    _d("finechat-samples", "all", "Apache-2.0", True, "this project: data/samples/",
       "one small file per format", "written for finechat"),
    _d("adgen-synthetic", "prompt-response", "Apache-2.0", True,
       "generated: finechat data generate adgen --n N --seed S --out FILE", "content, summary",
       "ADGEN-like, written for finechat"),
    _d("arithmetic-synthetic", "alpaca / pref-prompt", "Apache-2.0", True,
       "generated: finechat data generate arithmetic / finechat data pairs", "instruction, output, answer; "
       "prompt, chosen, rejected", "small sums with exact answers and corrupted ones, written for finechat"),
    _d("tools-synthetic", "openai / moss", "Apache-2.0", True,
       "generated: finechat data generate tools --n N --seed S --out FILE (finechat.tools.demo_data)", "messages with tool_calls, tools; "
       "MOSS plugin turns", "tool-use conversations with results from finechat's own tools, written for finechat"),
    _d("medical-kg-synthetic", "huatuo", "Apache-2.0", True,
       "generated: finechat data from-kg GRAPH.json --out FILE", "instruction, input, output",
       "from a small knowledge graph written for finechat"),
]}

MODELS: dict[str, Entry] = {e.name: e for e in [
    _m("smollm2", "llama", "Apache-2.0", True, "the default model; installed by `make install`",
       "SmolLM2-135M/360M/1.7B(-Instruct)"),
    _m("chatglm-6b", "chatglm", "ChatGLM-6B Model License", None, "THUDM's ChatGLM-6B release",
       "code Apache-2.0; weights free for research, commercial use only after registering with the authors"),
    _m("chatglm2-6b", "chatglm", "ChatGLM2-6B Model License", None, "THUDM's ChatGLM2-6B release",
       "commercial use only after registering with the authors"),
    _m("llama", "llama", "LLaMA non-commercial research licence", False, "Meta's LLaMA (v1) request form",
       "weights for non-commercial research only"),
    _m("llama-2", "llama", "Llama 2 Community License", True, "Meta's Llama 2 release",
       "commercial use allowed; services with over 700M monthly users need a separate licence"),
    _m("moss-moon-003", "moss", "AGPL-3.0 (weights)", None, "Fudan's MOSS release (moss-moon-003-base/sft/plugin)",
       "code Apache-2.0, data CC BY-NC 4.0; commercial use or public deployment needs the authors' authorisation"),
    _m("stablelm-base-alpha", "gpt-neox", "CC BY-SA 4.0", True, "Stability AI's StableLM-Alpha release"),
    _m("stablelm-tuned-alpha", "gpt-neox", "CC BY-NC-SA 4.0", False, "Stability AI's StableLM-Alpha release",
       "tuned on non-commercial data"),
    _m("dolly-v2", "gpt-neox", "MIT", True, "Databricks' dolly-v2-3b/7b/12b release"),
    _m("alpaca-7b", "llama", "CC BY-NC 4.0", False, "Stanford Alpaca weight diff (needs LLaMA weights)"),
    _m("chatdoctor", "llama", "LLaMA non-commercial research licence", False, "ChatDoctor project",
       "LLaMA-based; research only"),
    _m("huatuo-llama-med-chinese", "llama", "LLaMA non-commercial research licence", False,
       "Huatuo-Llama-Med-Chinese project", "LLaMA-based LoRA weights; research only"),
    _m("qwen2.5", "qwen2", "Apache-2.0", True, "Alibaba's Qwen2.5 release",
       "0.5B-32B except 3B are Apache-2.0; Qwen2.5-3B and 72B use Qwen's own licences"),
    _m("bloom", "bloom", "BigScience RAIL 1.0", True, "BigScience's BLOOM release", "use restrictions apply"),
]}

# Names a model folder or config may carry, mapped to a registry entry.
MODEL_ALIASES = {"default": "smollm2", "smollm2-135m-instruct": "smollm2", "smollm2-135m": "smollm2"}


def all_entries() -> list[Entry]:
    return list(DATASETS.values()) + list(MODELS.values())


def dataset_entry(name: str) -> Entry:
    """The registry entry of a data set, or ConfigError listing the known names."""
    if name not in DATASETS:
        raise ConfigError(f"unknown data set {name!r}; known: {', '.join(DATASETS)} "
                          "(or give a local path with no registry name)")
    return DATASETS[name]


def _unknown(name: str, kind: str) -> Entry:
    return Entry(name, kind, "unknown", None, "", note="not in the finechat registry")


def model_entry(model_name_or_path: str) -> Entry:
    """The registry entry of a model name or folder; "unknown" licence when the folder does not say.

    A folder says what it is through finechat's own files: ``finechat_source.json`` (written when the default
    model is converted), ``finechat_licenses.json`` or a training run's ``finechat_run.json`` (both name the
    base model and its licence).
    """
    key = str(model_name_or_path)
    low = key.lower()
    if low in MODEL_ALIASES:
        return MODELS[MODEL_ALIASES[low]]
    if low in MODELS:
        return MODELS[low]
    folder = Path(key).expanduser()
    if folder.is_dir():
        # A run's own licence file, or the "licenses" summary inside a training run's finechat_run.json.
        for name in (LICENCE_FILE, RUN_FILE):
            if not (folder / name).is_file():
                continue
            try:
                data = json.loads((folder / name).read_text(encoding="utf-8"))
                base = (data if "commercial_use" in data else data["licenses"])["model"]
                return Entry(key, "model", base["license"], base["commercial"], base.get("where", ""),
                             note=f"fine-tuned from {base['name']}")
            except (ValueError, KeyError, TypeError):
                continue
        src = folder / "finechat_source.json"
        if src.is_file():
            try:
                name = str(json.loads(src.read_text(encoding="utf-8")).get("model", "")).lower()
            except ValueError:
                name = ""
            if name in MODEL_ALIASES or name in MODELS:
                return MODELS[MODEL_ALIASES.get(name, name)]
    return _unknown(key, "model")


def _dataset_entries(dataset_names: list[str] | None) -> list[Entry]:
    out = []
    for name in dataset_names or []:
        out.append(DATASETS[name] if name in DATASETS else _unknown(str(name), "dataset"))
    return out


def check_commercial(model_name_or_path: str, dataset_names: list[str] | None, commercial: bool) -> None:
    """With ``commercial=True``, raise ConfigError naming every model or data set that is non-commercial or of
    unknown licence. Data given only as a path (no registry name) counts as unknown."""
    if not commercial:
        return
    bad = [e for e in [model_entry(model_name_or_path)] + _dataset_entries(dataset_names) if e.commercial is not True]
    if bad:
        items = "; ".join(f"{e.kind} {e.name!r} (licence: {e.license}, commercial use: {e.commercial_text})"
                          for e in bad)
        raise ConfigError(f"commercial: true, but these may not be used commercially: {items}. "
                          "Remove them or set commercial: false")


def licence_summary(model_name_or_path: str, dataset_names: list[str] | None = None) -> dict[str, Any]:
    """The licences of a run's base model and data, and whether the result may be used commercially."""
    model = model_entry(model_name_or_path)
    datasets = _dataset_entries(dataset_names)
    flags = [model.commercial] + [d.commercial for d in datasets]
    verdict = False if False in flags else (None if None in flags else True)
    blockers = [e.name for e in [model] + datasets if e.commercial is not True]

    def row(e: Entry) -> dict:
        return {"name": e.name, "license": e.license, "commercial": e.commercial, "where": e.where, "note": e.note}

    return {"model": row(model), "datasets": [row(d) for d in datasets], "commercial_use": verdict,
            "commercial_use_text": {True: "yes", False: "no", None: "unknown"}[verdict],
            "blocked_by": blockers, "disclaimer": DISCLAIMER}


def write_licence_summary(output_dir: str | Path, model_name_or_path: str,
                          dataset_names: list[str] | None = None) -> dict[str, Any]:
    """Write ``finechat_licenses.json`` into a run's output folder and return the summary."""
    summary = licence_summary(model_name_or_path, dataset_names)
    write_json_atomic(Path(output_dir) / LICENCE_FILE, summary)
    return summary


def with_data_sources(summary: dict[str, Any], sources: list[dict], dataset_names: list[str] | None) -> dict[str, Any]:
    """The summary with each data source of the run and the rows it gave (``data_sources``); with one registry
    name per source (``datasets`` in the order of ``data``), each source also names its data set and licence."""
    names = list(dataset_names or [])
    rows = []
    for i, s in enumerate(sources):
        row = dict(s)
        if len(names) == len(sources):
            e = DATASETS[names[i]] if names[i] in DATASETS else _unknown(str(names[i]), "dataset")
            row.update(dataset=e.name, license=e.license, commercial=e.commercial)
        rows.append(row)
    return {**summary, "data_sources": rows}


def licence_lines(summary: dict[str, Any]) -> list[str]:
    """A short human-readable form of a licence summary (for run summaries)."""
    m = summary["model"]
    lines = [f"base model: {m['name']} ({m['license']})"]
    lines += [f"data: {d['name']} ({d['license']})" for d in summary["datasets"]]
    for s in summary.get("data_sources", []):
        rows = f": {s['rows']} rows" if "rows" in s else ""
        named = f" = {s['dataset']} ({s['license']})" if "dataset" in s else ""
        lines.append(f"data source: {s['source']}{named}{rows}")
    verdict = summary["commercial_use_text"]
    extra = f" (blocked by: {', '.join(summary['blocked_by'])})" if summary["blocked_by"] else ""
    lines.append(f"commercial use of the result: {verdict}{extra}")
    return lines


def registry_table(kind: str | None = None) -> str:
    """The registry as a plain-text table."""
    entries = [e for e in all_entries() if kind in (None, e.kind)]
    header = ("kind", "name", "format", "licence", "commercial", "where to get it")
    rows = [(e.kind, e.name, e.format, e.license, e.commercial_text, e.where) for e in entries]
    widths = [min(max(len(str(r[i])) for r in rows + [header]), 44) for i in range(len(header) - 1)]

    def fmt(r: tuple) -> str:
        cells = [str(c)[:w].ljust(w) for c, w in zip(r, widths)]
        return "  ".join(cells + [str(r[-1])])

    sep = "  ".join("-" * w for w in widths) + "  " + "-" * 15
    return "\n".join([fmt(header), sep] + [fmt(r) for r in rows])

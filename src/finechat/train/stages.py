"""Multi-stage training (ChatDoctor's general instructions -> domain dialogues), resumable, with one summary.

A config with ``stages:`` runs :func:`finechat.train.recipe.run_training` once per stage, each stage with
its own data, method and hyperparameters (any ``finechat train`` key; ``defaults:`` apply to every stage)::

    model: default
    output_dir: output/medical
    continue_from: merged          # or: adapter (the same LoRA / P-Tuning adapter keeps training)
    defaults: {method: lora, cutoff_len: 256, learning_rate: 1.0e-3}
    eval_general: {data: data/samples/alpaca.json, max_samples: 8}   # before / after: forgetting
    # or on standard benchmarks (lm-evaluation-harness task names or task files), with or without data:
    # eval_general: {tasks: [data/tasks/finechat_mc/finechat_mc_en.yaml, mmlu], limit: 50}
    stages:
      - {name: general, data: [data/samples/alpaca.json], max_steps: 20}
      - name: domain
        data: [data/samples/huatuo.json]
        mix: {data: [data/samples/alpaca.json], ratio: 0.2}         # 20% general examples mixed in
        max_steps: 20

Each stage starts from the previous stage's result: with ``continue_from: merged`` the previous LoRA is
merged into its base (``finechat.train.export``) and the next stage trains a fresh adapter (or the full
model) on that; with ``adapter`` the base stays the original model and the previous adapter is trained
further. A stage's files live in ``output_dir/NN-name/``; ``stages_state.json`` records finished stages, so a
killed run started again skips them and resumes the interrupted stage from its newest complete checkpoint.
``stages_summary.json`` / ``.md`` hold every stage's metrics and data licences.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any, Literal

from finechat.config import field, load_yaml, resolve_config, to_dict
from finechat.console import log
from finechat.data.catalog import licence_lines, licence_summary
from finechat.data.formats import read_conversations, write_conversations
from finechat.errors import ConfigError
from finechat.eval import harness
from finechat.eval.metrics import format_table
from finechat.eval.predict import load_examples, predict
from finechat.files import write_json_atomic, write_text_atomic
from finechat.generate.chat_loader import load as load_chat_model
from finechat.generate.contract import ChatEngine
from finechat.generate.settings import GenerationSettings
from finechat.train.alignment_eval import AlignmentEvalConfig, AlignmentScorer
from finechat.train.export import EXPORT_FILE, export_model
from finechat.train.preflight import check_records
from finechat.train.recipe import run_training
from finechat.train.stage_table import STAGES
from finechat.train.train_config import TrainConfig

STATE_FILE = "stages_state.json"
# alignment_eval's numbers -> the summary's column names
ALIGNMENT_NAMES = {"preference accuracy": "pref acc", "log-ratio margin": "reward margin", "logp accuracy": "logp acc",
                   "rm accuracy": "rm acc", "rm score": "rm score", "correct": "correct", "calculator": "calculator"}


SUMMARY_FILE = "stages_summary.json"
MERGEABLE_METHODS = ("lora", "qlora", "full", "freeze")
ADAPTER_METHODS = ("lora", "qlora", "ptuning")


@dataclasses.dataclass
class MixConfig:
    """General data mixed into a stage's training data (against forgetting)."""

    data: list[str] = field([], help="general data files")
    ratio: float = field(0.2, help="share of general examples in the stage's mixed training data (0 < r < 1)")
    format: str = field("auto", help="data format of the general files")
    datasets: list[str] = field([], help="registry names of the general data (their licences are recorded)")

    def __post_init__(self) -> None:
        if isinstance(self.data, str):
            self.data = [self.data]
        if not self.data:
            raise ValueError("mix: data is empty")
        if not 0 < self.ratio < 1:
            raise ValueError(f"mix: ratio must be between 0 and 1 (exclusive), got {self.ratio}")


@dataclasses.dataclass
class GeneralEvalConfig:
    """A general set scored before the first stage and after each stage, to show forgetting."""

    data: str | None = field(None, help="general evaluation data file")
    format: str = field("auto", help="its data format")
    max_samples: int | None = field(16, help="score only the first N examples")
    max_new_tokens: int = field(64, help="answer length limit")
    batch_size: int = field(8, help="examples generated together")
    tasks: list[str] = field([], help="lm-evaluation-harness tasks (names, task .yaml files or folders)")
    limit: float | None = field(None, help="with tasks: the first N examples of each task (below 1: a fraction)")
    num_fewshot: int | None = field(None, help="with tasks: few-shot examples (default: each task's own)")
    trust_task_code: bool = field(False, help="let task files run their own Python code (!function entries)")

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str):
            self.tasks = [t for t in self.tasks.split(",") if t.strip()]
        if not self.data and not self.tasks:
            raise ValueError("eval_general: give data (a general set) and/or tasks (lm-eval tasks)")


@dataclasses.dataclass
class StagesConfig:
    """A multi-stage training run."""

    model: str = field("default", help="the base model of the first stage")
    output_dir: str = field("output/stages", help="one sub-folder per stage, plus the state and summary")
    continue_from: Literal["merged", "adapter"] = field(
        "merged", help="how a stage starts from the previous one: its merged model, or the same adapter continued"
    )
    merge_final: bool = field(False, help="also merge the last stage's adapter into a plain model folder")
    defaults: dict = field({}, help="finechat train keys applied to every stage")
    stages: list[dict] = field([], help="the stages: each a mapping of finechat train keys plus name and mix")
    eval_general: dict = field({}, help="general set scored before and after: data, max_samples, max_new_tokens; "
                                        "and/or lm-eval tasks, limit, num_fewshot")
    eval_alignment: dict = field({}, help="held-out pairs / prompts scored before and after each stage: pairs, "
                                 "prompts, max_samples (finechat.train.alignment_eval)")

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("stages: give at least one stage")


@dataclasses.dataclass
class Stage:
    name: str
    train: dict  # finechat train keys (TrainConfig) before the chaining keys are added
    mix: MixConfig | None


def parse_stages(cfg: StagesConfig) -> list[Stage]:
    """Validate every stage up front, so that stage 3's typo is found before stage 1 trains for an hour."""

    out, names = [], set()
    for i, raw in enumerate(cfg.stages):
        if not isinstance(raw, dict):
            raise ConfigError(f"stages[{i}]: expected a mapping of settings")
        raw = dict(raw)
        name = str(raw.pop("name", f"stage{i + 1}"))
        if name in names:
            raise ConfigError(f"stages[{i}]: the name {name!r} is used twice")
        names.add(name)
        mix = raw.pop("mix", None)
        for key in ("model", "adapter", "output_dir", "resume_from_checkpoint"):
            if key in raw:
                raise ConfigError(f"stages[{i}] ({name}): {key} is set by the stage chain; set it at the top level")
        train = {**cfg.defaults, **raw}
        try:
            resolve_config(TrainConfig, base={**train, "model": cfg.model, "output_dir": "x"})
            mix_cfg = resolve_config(MixConfig, base=mix) if mix is not None else None
        except ConfigError as e:
            raise ConfigError(f"stages[{i}] ({name}): {e}") from e
        out.append(Stage(name, train, mix_cfg))
    methods = [s.train.get("method", "lora") for s in out]
    if cfg.continue_from == "adapter":
        if methods[0] not in ADAPTER_METHODS or any(m != methods[0] for m in methods):
            raise ConfigError(f"continue_from: adapter needs one adapter method (lora, qlora or ptuning) in every "
                              f"stage; the stages use {', '.join(methods)}")
    else:
        for s, m in zip(out[:-1], methods[:-1]):
            if m not in MERGEABLE_METHODS:
                raise ConfigError(f"stage {s.name}: {m} cannot be merged into its base, so no later stage can start "
                                  "from a merged model; use continue_from: adapter or make it the last stage")
    return out


# -- state --------------------------------------------------------------------------------------------------
def _read_state(out: Path) -> dict:
    path = out / STATE_FILE
    if not path.is_file():
        return {"stages": {}}
    return json.loads(path.read_text(encoding="utf-8"))


def _write_state(out: Path, state: dict) -> None:
    write_json_atomic(out / STATE_FILE, state)


# -- pieces ---------------------------------------------------------------------------------------------------
def mix_data(stage: Stage, stage_dir: Path, seed: int) -> tuple[list[str], str, dict]:
    """Write the stage's data plus general data at ``mix.ratio`` as one OpenAI-format file."""

    columns = {k: stage.train[k] for k in ("prompt_column", "response_column", "history_column") if stage.train.get(k)}
    domain = read_conversations(stage.train.get("data") or [], format=stage.train.get("format", "auto"),
                                on_bad_record=stage.train.get("on_bad_record", "error"), **columns)
    general = read_conversations(stage.mix.data, format=stage.mix.format,
                                 on_bad_record=stage.train.get("on_bad_record", "error"))
    for result in (domain, general):
        if result.skipped:
            log(result.skipped_table())
    n_domain, pool = len(domain.conversations), list(general.conversations)
    if not pool or not n_domain:
        raise ConfigError(f"stage {stage.name}: mix needs domain and general examples")
    n_general = round(n_domain * stage.mix.ratio / (1 - stage.mix.ratio))
    rng = random.Random(seed)
    picked = []
    while len(picked) < n_general:  # cycle through shuffled copies when the general set is small
        batch = pool[:]
        rng.shuffle(batch)
        picked += batch[: n_general - len(picked)]
    mixed = domain.conversations + picked
    rng.shuffle(mixed)
    path = stage_dir / "mixed_train.jsonl"
    write_conversations(mixed, path, "openai")
    info = {"domain_examples": n_domain, "general_examples": len(picked), "ratio": stage.mix.ratio,
            "general_files": stage.mix.data, "file": str(path)}
    log(f"stage {stage.name}: mixed {n_domain} domain + {len(picked)} general examples -> {path}")
    return [str(path)], "openai", info


def general_eval(bot: ChatEngine, gcfg: GeneralEvalConfig, out_dir: Path, source: tuple[str, str | None]) -> dict:
    """BLEU-4 / Rouge / eval loss of one loaded model on the general set, and its lm-eval task scores
    (``TASK METRIC``); ``source``: its (model, adapter), recorded with the task results."""
    out: dict[str, Any] = {}
    if gcfg.data:
        examples = load_examples(gcfg.data, gcfg.format, gcfg.max_samples)
        metrics, _ = predict(bot, examples, out_dir, GenerationSettings(greedy=True,
                                                                        max_new_tokens=gcfg.max_new_tokens),
                             gcfg.batch_size, with_loss=True)
        out.update({k: metrics.get(k) for k in ("bleu-4", "rouge-1", "rouge-2", "rouge-l", "eval_loss", "perplexity",
                                                "n")})
    if gcfg.tasks:
        tasks = harness.resolve_tasks(gcfg.tasks, gcfg.trust_task_code)
        results = harness.evaluate(bot, tasks, limit=gcfg.limit, num_fewshot=gcfg.num_fewshot, batch_size=gcfg.batch_size)
        harness.write_results(results, out_dir / "lm_eval_results.json", {"model": source[0], "adapter": source[1]})
        for task, values in harness.scores(results).items():
            out.update({f"{task} {metric}": value for metric, value in values.items()})
    return out


def merge(model: str, adapter: str, out: Path) -> str:
    if (out / EXPORT_FILE).is_file():  # merged before a restart
        return str(out)
    export_model(model, adapter, out, force=True)
    return str(out)


# -- the run ----------------------------------------------------------------------------------------------------
def run_stages(cfg: StagesConfig) -> dict:
    """Train the stages in order (skipping finished ones); return and write the summary."""

    stages = parse_stages(cfg)
    for _, stage_cfg in stage_train_configs(cfg):  # every record of every stage's data files, before any model loads
        check_records(stage_cfg, STAGES[stage_cfg.stage].records)
    gcfg = resolve_config(GeneralEvalConfig, base=cfg.eval_general) if cfg.eval_general else None
    if gcfg is not None and gcfg.tasks:
        # a task without its data (or with task code not allowed) fails before training
        harness.check_tasks(harness.resolve_tasks(gcfg.tasks, gcfg.trust_task_code))
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = _read_state(out)
    state["config"] = to_dict(cfg)
    template = cfg.defaults.get("template")
    acfg = resolve_config(AlignmentEvalConfig, base={"template": template, **cfg.eval_alignment}) \
        if cfg.eval_alignment else None
    scorer = AlignmentScorer(acfg) if acfg is not None else None
    need = [k for k, c in (("alignment_before", scorer), ("general_before", gcfg)) if c is not None and k not in state]
    if need:
        log("Scoring the base model on the held-out and general sets (before any stage) ...")
        bot = load_chat_model(cfg.model, dtype="float32", template=template)  # one load for both reports
        if "alignment_before" in need:
            state["alignment_before"] = scorer.score(bot, (cfg.model, None), None, out / "alignment_before", None)
        if "general_before" in need:
            state["general_before"] = general_eval(bot, gcfg, out / "general_before", (cfg.model, None))
        del bot
        _write_state(out, state)

    model, adapter = cfg.model, None
    for i, step in enumerate(stages):
        stage_dir = out / f"{i + 1:02d}-{step.name}"
        done = state["stages"].get(step.name)
        if done and done.get("status") == "done":
            log(f"stage {i + 1}/{len(stages)} {step.name}: already done, skipped ({done['checkpoint']})")
            model, adapter = done["next_model"], done["next_adapter"]
            continue
        stage_dir.mkdir(parents=True, exist_ok=True)
        train = dict(step.train)
        mix_info = None
        if step.mix is not None:
            train["data"], train["format"], mix_info = mix_data(step, stage_dir, int(train.get("seed", 42)))
            for k in ("prompt_column", "response_column", "history_column"):
                train.pop(k, None)
            train["datasets"] = list(train.get("datasets") or []) + list(step.mix.datasets)
        if "reward_model" in getattr(STAGES.get(train.get("stage", "sft")), "uses", ()) \
                and "reward_model" in (train.get("rewards") or []) and not train.get("reward_model"):
            train["reward_model"] = state.get("reward_model")  # the reward model an earlier rm stage trained
        train.update(model=model, adapter=adapter, output_dir=str(stage_dir / "train"), resume_from_checkpoint="auto")
        tcfg = resolve_config(TrainConfig, base=train)
        log(f"stage {i + 1}/{len(stages)} {step.name}: {tcfg.method} on {model}"
            f"{' + adapter ' + adapter if adapter else ''}")
        result = run_training(tcfg)
        kind = STAGES[tcfg.stage]
        checkpoint = result.final_checkpoint
        if checkpoint is None:
            raise ConfigError(f"stage {step.name} produced no checkpoint (save_steps larger than max_steps?)")
        is_adapter = tcfg.adapter_method in ("lora", "ptuning")
        last = i == len(stages) - 1
        if not kind.policy:  # a reward model scores the policy; the policy chain goes on from before it
            next_model, next_adapter = model, adapter
            state["reward_model"] = checkpoint
        elif not is_adapter:
            next_model, next_adapter = checkpoint, None  # a full / freeze checkpoint is a whole model
        elif cfg.continue_from == "adapter":
            next_model, next_adapter = model, checkpoint
        elif last and not cfg.merge_final:
            next_model, next_adapter = model, checkpoint
        else:
            log(f"stage {step.name}: merging its adapter into the base for the next stage ...")
            next_model, next_adapter = merge(model, checkpoint, stage_dir / "merged"), None
        record: dict[str, Any] = {
            "status": "done", "index": i + 1, "method": tcfg.method, "checkpoint": checkpoint,
            "started_from": {"model": model, "adapter": adapter},
            "next_model": next_model, "next_adapter": next_adapter, "steps": result.global_step,
            "resumed_from": result.resumed_from,
            "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float, str))},
            "data": tcfg.data, "mix": mix_info, "licenses": licence_summary(cfg.model, tcfg.datasets),
        }
        if not kind.policy:
            if scorer is not None:
                log(f"stage {step.name}: scoring the reward model on the held-out pairs ...")
                record["alignment"] = scorer.reward_model_accuracy(checkpoint)
        elif gcfg is not None or scorer is not None:
            # one load for both reports (float32: log-ratios of nearly equal models are small differences)
            bot = load_chat_model(next_model, adapter=next_adapter, dtype="float32", template=template)
            if gcfg is not None:
                log(f"stage {step.name}: scoring on the general set ...")
                record["general"] = general_eval(bot, gcfg, stage_dir / "general_eval", (next_model, next_adapter))
            if scorer is not None:
                log(f"stage {step.name}: scoring on the held-out pairs and prompts ...")
                record["alignment"] = scorer.score(bot, (next_model, next_adapter), (model, adapter),
                                                   stage_dir / "alignment_eval", state.get("reward_model"))
            del bot
        state["stages"][step.name] = record
        _write_state(out, state)
        model, adapter = next_model, next_adapter

    all_datasets = []
    for step in stages:
        all_datasets += list(state["stages"][step.name]["licenses"]["datasets"])
    names = list(dict.fromkeys(d["name"] for d in all_datasets))
    licences = licence_summary(cfg.model, names)
    summary = {"stages": [state["stages"][s.name] for s in stages], "general_before": state.get("general_before"),
               "licenses": licences, "final": {"model": model, "adapter": adapter}}
    table = summary_table(stages, state)
    write_text_atomic(out / SUMMARY_FILE, json.dumps(summary, indent=2, ensure_ascii=False, default=str) + "\n")
    text = table + "\n\n" + "\n".join(f"- {line}" for line in licence_lines(licences))
    write_text_atomic(out / "stages_summary.md", text + "\n")
    summary["table"] = text
    return summary


def alignment_columns(found: dict | None) -> dict:
    """The summary columns of an alignment report (finechat.train.alignment_eval)."""
    return {name: (found or {}).get(key) for key, name in ALIGNMENT_NAMES.items()}


def summary_table(stages: list[Stage], state: dict) -> str:
    """One row per stage (and the base before training): loss, eval and general-set scores, data licences."""
    rows: dict[str, dict] = {}
    if state.get("general_before") or state.get("alignment_before"):
        g = state.get("general_before") or {}
        rows["base (before)"] = {"general bleu-4": g.get("bleu-4"), "general rouge-l": g.get("rouge-l"),
                                 "general loss": g.get("eval_loss"), **alignment_columns(state.get("alignment_before"))}
    for i, s in enumerate(stages):
        r = state["stages"][s.name]
        m, g = r["metrics"], r.get("general") or {}
        row = {"method": r["method"], "steps": r["steps"], "train loss": m.get("final_loss"),
               "eval loss": m.get("eval_loss"), "bleu-4": m.get("predict_bleu-4"), "rouge-l": m.get("predict_rouge-l"),
               "general bleu-4": g.get("bleu-4"), "general rouge-l": g.get("rouge-l"), "general loss": g.get("eval_loss"),
               **alignment_columns(r.get("alignment")),
               "data licences": ", ".join(f"{d['name']} ({d['license']})" for d in r["licenses"]["datasets"]) or "-"}
        row.update(_task_columns(g))
        rows[f"{i + 1}. {s.name}"] = row
    if state.get("general_before"):
        rows["base (before)"].update(_task_columns(state["general_before"]))
    task_columns = list(dict.fromkeys(c for r in rows.values() for c in r if c.startswith("general ") and
                                      c not in ("general bleu-4", "general rouge-l", "general loss")))
    columns = [c for c in ("method", "steps", "train loss", "eval loss", "bleu-4", "rouge-l", *ALIGNMENT_NAMES.values(),
                           "general bleu-4", "general rouge-l", "general loss", *task_columns, "data licences")
               if any(r.get(c) is not None for r in rows.values())]
    return format_table(rows, columns, first="stage")


def _task_columns(general: dict) -> dict:
    """The lm-eval scores of a general evaluation (``TASK METRIC`` keys) as ``general TASK METRIC`` columns."""
    known = {"bleu-4", "rouge-1", "rouge-2", "rouge-l", "eval_loss", "perplexity", "n"}
    return {f"general {k}": v for k, v in general.items() if k not in known}


def is_stages_file(path: str | Path) -> bool:
    """Whether a YAML config describes a multi-stage run."""
    return "stages" in load_yaml(path)


def resolve_stages(config_file: str, overrides: list[str]) -> tuple[StagesConfig, list[str]]:
    """The StagesConfig of ``STAGES.yaml key=value ...`` and the overrides that were not ``defaults.KEY``.

    Overrides are top-level keys, or ``defaults.KEY=VALUE`` for all stages: given on the command line, it also
    replaces the value a stage sets itself (``defaults.max_steps=2`` makes every stage a quick try).
    """
    import yaml

    base = load_yaml(config_file)
    defaults = dict(base.get("defaults") or {})
    given: dict[str, Any] = {}
    plain = []
    for item in overrides:
        key, _, raw = item.partition("=")
        if key.startswith("defaults."):
            given[key[len("defaults."):]] = yaml.safe_load(raw) if raw else ""
        else:
            plain.append(item)
    base["defaults"] = {**defaults, **given}
    if isinstance(base.get("stages"), list):
        base["stages"] = [{**raw, **{k: v for k, v in given.items() if k in raw}} if isinstance(raw, dict)
                          else raw for raw in base["stages"]]
    try:
        return resolve_config(StagesConfig, base=base, overrides=plain), plain
    except ConfigError as e:
        raise ConfigError(f"{config_file}: {e}") from e


def stage_train_configs(cfg: StagesConfig) -> list[tuple[str, TrainConfig]]:
    """Each stage's TrainConfig as it will run on the chain's base model (for ``--estimate``: a merged stage
    has the same shapes as its base, and a continued adapter the same trainable parameters)."""
    return [(step.name, resolve_config(TrainConfig, base={**step.train, "model": cfg.model}))
            for step in parse_stages(cfg)]


def main_stages(config_file: str, overrides: list[str]) -> int:
    """``finechat train STAGES.yaml [key=value ...]``: top-level keys, or ``defaults.KEY=VALUE`` for all stages."""
    cfg, _ = resolve_stages(config_file, overrides)
    summary = run_stages(cfg)
    print(summary["table"])
    final = summary["final"]
    print(f"\nChat with the result: finechat chat --model {final['model']}"
          + (f" --adapter {final['adapter']}" if final["adapter"] else ""))
    return 0


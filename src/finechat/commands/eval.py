"""Evaluate a model or adapter (BLEU-4, Rouge-1/2/L, eval loss), re-score predictions, or compare models.

  finechat eval --model M [--adapter A] --data FILE          generate, score, write predictions + metrics
  finechat eval --predictions generated_predictions.jsonl    re-score a file (ours, ChatGLM-6B's, LLaMA-Factory's)
  finechat eval --data FILE --compare base out/lora out/pt   one table side by side + example answers
  finechat eval --reward-model out/rm/checkpoint-N --data PAIRS   the reward model's pairwise accuracy
  finechat eval --reward-model RM --data FILE [--adapter A]      generate answers and score them with RM
  finechat eval --tasks mmlu,ceval-valid|TASK.yaml|FOLDER [--limit N] [--num-fewshot K]
                                                            lm-evaluation-harness tasks (also with --compare)

Rouge-1/2/L are computed on jieba words, BLEU-4 on characters (see finechat.eval.metrics).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from finechat.config import add_config_arguments, config_from_args, field
from finechat.errors import ConfigError
from finechat.eval import harness
from finechat.eval.compare import compare, resolve_entries, side_by_side
from finechat.eval.metrics import format_table
from finechat.eval.predict import load_examples, predict, rescore
from finechat.files import write_json_atomic, write_text_atomic
from finechat.generate.chat_loader import load as load_chat_model
from finechat.generate.settings import GenerationSettings
from finechat.models.options import ModelOptions


@dataclasses.dataclass
class EvalConfig(GenerationSettings, ModelOptions):
    """Settings of ``finechat eval``."""

    data: str | None = field(None, help="data file to evaluate on (any format finechat reads)")
    format: str = field("auto", help="data format (auto-detected from the keys)")
    max_samples: int | None = field(None, help="evaluate only the first N examples")
    batch_size: int = field(8, help="examples generated together")
    output_dir: str | None = field(None, help="where to write generated_predictions.jsonl and metrics.json "
                                              "(default: ADAPTER/eval, else output/eval)")
    loss: bool = field(True, help="also compute eval loss and perplexity on the labels")
    show_examples: int = field(2, help="example answers to print")
    tasks: str | None = field(None, help="lm-evaluation-harness tasks: names (mmlu,ceval-valid,...), task .yaml "
                                         "files or folders of them, comma-separated")
    limit: float | None = field(None, help="with --tasks: the first N examples of each task (below 1: a fraction)")
    num_fewshot: int | None = field(None, help="with --tasks: few-shot examples (default: each task's own)")
    # Evaluation defaults: greedy (scores repeat) and ChatGLM-6B ptuning's answer length for ADGEN.
    max_new_tokens: int = field(128, help="most tokens to generate for one answer")
    do_sample: bool = field(False, help="sample instead of greedy decoding (with temperature, top_p, seed)")

    def __post_init__(self) -> None:
        GenerationSettings.__post_init__(self)
        ModelOptions.__post_init__(self)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, EvalConfig)
    parser.add_argument("--predictions", metavar="FILE",
                        help="re-score an existing predictions file ({predict, label} or {predict, labels}) "
                             "without loading a model")
    parser.add_argument("--reward-model", metavar="DIR",
                        help="a stage-rm checkpoint: pairwise accuracy on preference data, or the reward of the "
                             "answers the model generates for --data")
    parser.add_argument("--compare", nargs="+", metavar="ENTRY",
                        help="compare several entries: 'base' (--model alone), adapter folders, model folders "
                             "or predictions files")


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(EvalConfig, args)
    if args.predictions:
        metrics = rescore(args.predictions)
        print(format_table({Path(args.predictions).name: metrics}, first="predictions"))
        if cfg.output_dir:
            write_json_atomic(Path(cfg.output_dir) / "metrics.json", metrics)
        return 0
    settings = GenerationSettings.from_kwargs(None, **{f.name: getattr(cfg, f.name)
                                                       for f in dataclasses.fields(GenerationSettings)})
    load_options = dict(dtype=cfg.dtype, device=cfg.device, template=cfg.template,
                        quantization_bit=cfg.quantization_bit, trust_remote_code=cfg.trust_remote_code,
                        compile=cfg.compile, engine=cfg.engine)
    if args.reward_model:
        from finechat.commands._eval_reward_report import reward_eval

        print(reward_eval(args.reward_model, cfg, settings, load_options))
        return 0
    if cfg.tasks:
        return _harness(cfg, args, load_options)
    examples = None
    if cfg.data:
        examples = load_examples(cfg.data, cfg.format, cfg.max_samples)
    if args.compare:
        entries = resolve_entries(args.compare, cfg.model)
        report = compare(entries, examples, cfg.output_dir or "output/eval-compare", load_options, settings,
                         cfg.batch_size, cfg.loss, cfg.show_examples)
        print(report["table"])
        if report["examples"]:
            print()
            print(report["examples"])
        return 0
    if examples is None:
        raise ConfigError("give --data FILE (with --model / --adapter), --predictions FILE or --compare ...")
    output_dir = cfg.output_dir or (str(Path(cfg.adapter) / "eval") if cfg.adapter else "output/eval")
    bot = load_chat_model(cfg.model, adapter=cfg.adapter, **load_options)
    metrics, records = predict(bot, examples, output_dir, settings, cfg.batch_size, cfg.loss,
                               info={"model": cfg.model, "adapter": cfg.adapter, "data": cfg.data})
    name = Path(cfg.adapter).name if cfg.adapter else Path(cfg.model).name
    print(format_table({name: metrics}))
    if cfg.show_examples:
        print()
        print(side_by_side({name: records}, cfg.show_examples))
    print(f"\nWrote {output_dir}/generated_predictions.jsonl and {output_dir}/metrics.json")
    return 0


def _harness(cfg: EvalConfig, args: argparse.Namespace, load_options: dict) -> int:
    """``--tasks``: lm-eval's tasks on the model (or on each ``--compare`` entry), its table and JSON."""
    tasks = harness.resolve_tasks(cfg.tasks)
    options = dict(limit=cfg.limit, num_fewshot=cfg.num_fewshot, batch_size=cfg.batch_size)
    if args.compare:
        output_dir = cfg.output_dir or "output/eval-compare"
        runs = harness.evaluate_entries(resolve_entries(args.compare, cfg.model), tasks, load_options, output_dir,
                                        **options)
        table = harness.compare_table(runs)
        write_text_atomic(Path(output_dir, "lm_eval_compare.md"), table + "\n")
        print(table)
        print(f"\nWrote {output_dir}/lm_eval_compare.md and {output_dir}/NAME/lm_eval_results.json")
        return 0
    harness.check_tasks(tasks)  # a missing dataset fails before the model is loaded
    output_dir = cfg.output_dir or (str(Path(cfg.adapter) / "eval") if cfg.adapter else "output/eval")
    bot = load_chat_model(cfg.model, adapter=cfg.adapter, **load_options)
    results = harness.evaluate(bot, tasks, check=False, **options)
    print(harness.results_table(results))
    path = harness.write_results(results, Path(output_dir) / "lm_eval_results.json",
                                 {"model": cfg.model, "adapter": cfg.adapter, "tasks": cfg.tasks, **options})
    print(f"Wrote {path}")
    return 0

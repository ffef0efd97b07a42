"""The medical vertical (ChatDoctor / Huatuo): run the multi-stage recipe and score knowledge-graph questions.

Examples:
  finechat medical run recipes/medical/recipe.yaml                  # train all stages, then the one table
  finechat medical run recipes/medical/recipe.yaml model=/path/to/llama output_dir=output/med-llama
  finechat medical eval --model default --questions data/samples/medical/kg_qa.heldout.jsonl
  finechat medical eval --model out/med --dtype bfloat16 max_questions=20 output_dir=out/med/kg-eval
  finechat data from-kg data/samples/medical/graph.json --out qa.jsonl --holdout 0.2   # make your own data
  finechat chat --knowledge data/samples/medical/diseases.csv       # retrieval + sources + notice
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from finechat.config import add_config_arguments, config_from_args, field
from finechat.errors import ConfigError
from finechat.generate.chat_loader import load
from finechat.medical import evaluate as medical
from finechat.models.options import ModelOptions

RUNS_MODEL = True  # runs under models.device.cpu_threads (see finechat.cli)

DEFAULT_QUESTIONS = "data/samples/medical/kg_qa.heldout.jsonl"


@dataclasses.dataclass
class MedicalEvalConfig(ModelOptions):
    """Settings of ``finechat medical eval`` (flags, ``--config FILE.yaml`` or ``key=value``, as other commands)."""

    template: str | None = field("huatuo", help="prompt template (the medical recipe trains with huatuo)")
    questions: str = field(DEFAULT_QUESTIONS, help="held-out questions from finechat data from-kg --holdout")
    max_questions: int | None = field(None, help="score only the first N questions")
    max_new_tokens: int = field(48, help="answer length limit")
    batch_size: int = field(8, help="questions generated together")
    output_dir: str | None = field(None, help="folder for kg_predictions.jsonl and kg_metrics.json")

    def __post_init__(self) -> None:
        ModelOptions.__post_init__(self)
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_questions is not None and self.max_questions < 1:
            raise ValueError(f"max_questions must be >= 1, got {self.max_questions}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n", 2)[2]
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    run = sub.add_parser("run", help="train every stage of a recipe, then score base and stages on KG questions")
    run.add_argument("recipe", help="a stages recipe (YAML with stages:), e.g. recipes/medical/recipe.yaml")
    run.add_argument("overrides", nargs="*", help="key=value overrides, as for finechat train (defaults.KEY=V too)")
    ev = sub.add_parser("eval", help="score one model (+ adapter) on held-out KG questions")
    add_config_arguments(ev, MedicalEvalConfig)
    # The old spelling, kept working: every other command says --output-dir.
    ev.add_argument("--out", dest="output_dir", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    run.add_argument("--questions", default=DEFAULT_QUESTIONS,
                     help=f"held-out questions from finechat data from-kg --holdout (default: {DEFAULT_QUESTIONS})")
    run.add_argument("--max-questions", type=int, default=None, help="score only the first N questions")
    run.add_argument("--max-new-tokens", type=int, default=48, help="answer length limit")
    run.add_argument("--batch-size", type=int, default=8, help="questions generated together")


def main(args: argparse.Namespace) -> int:
    if args.action == "run":
        bad = [o for o in args.overrides if "=" not in o]
        if bad:
            raise ConfigError(f"expected key=value after the recipe, got {bad[0]!r}")
        print(medical.run_medical_recipe(args.recipe, args.overrides, args.questions, args.max_questions,
                                         args.max_new_tokens, args.batch_size))
        return 0
    cfg = config_from_args(MedicalEvalConfig, args)
    questions = medical.load_kg_questions(cfg.questions, cfg.max_questions)
    bot = load(cfg.model, adapter=cfg.adapter, dtype=cfg.dtype, device=cfg.device, template=cfg.template,
               quantization_bit=cfg.quantization_bit, trust_remote_code=cfg.trust_remote_code, compile=cfg.compile,
               engine=cfg.engine)
    metrics, records = medical.evaluate_kg(bot, questions, cfg.batch_size, cfg.max_new_tokens)
    if cfg.output_dir:
        medical.write_records(Path(cfg.output_dir), records, metrics)
    print(medical.medical_table({cfg.adapter or cfg.model: {"kg": metrics}}))
    return 0

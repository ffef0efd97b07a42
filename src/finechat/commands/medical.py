"""The medical vertical (ChatDoctor / Huatuo): run the multi-stage recipe and score knowledge-graph questions.

Examples:
  finechat medical run recipes/medical/recipe.yaml                  # train all stages, then the one table
  finechat medical run recipes/medical/recipe.yaml model=/path/to/llama output_dir=output/med-llama
  finechat medical eval --model default --questions data/samples/medical/kg_qa.heldout.jsonl
  finechat data from-kg data/samples/medical/graph.json --out qa.jsonl --holdout 0.2   # make your own data
  finechat chat --knowledge data/samples/medical/diseases.csv       # retrieval + sources + notice
"""

from __future__ import annotations

import argparse
from pathlib import Path

from finechat.errors import ConfigError
from finechat.generate.load import load
from finechat.medical import evaluate as medical

DEFAULT_QUESTIONS = "data/samples/medical/kg_qa.heldout.jsonl"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n", 2)[2]
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    run = sub.add_parser("run", help="train every stage of a recipe, then score base and stages on KG questions")
    run.add_argument("recipe", help="a stages recipe (YAML with stages:), e.g. recipes/medical/recipe.yaml")
    run.add_argument("overrides", nargs="*", help="key=value overrides, as for finechat train (defaults.KEY=V too)")
    ev = sub.add_parser("eval", help="score one model (+ adapter) on held-out KG questions")
    ev.add_argument("--model", default="default", help="model: default, a folder or a .gguf file")
    ev.add_argument("--adapter", default=None, help="a peft adapter folder")
    ev.add_argument("--template", default="huatuo", help="prompt template (default: huatuo)")
    ev.add_argument("--out", default=None, help="folder for kg_predictions.jsonl and kg_metrics.json")
    for p in (run, ev):
        p.add_argument("--questions", default=DEFAULT_QUESTIONS,
                       help=f"held-out questions from finechat data from-kg --holdout (default: {DEFAULT_QUESTIONS})")
        p.add_argument("--max-questions", type=int, default=None, help="score only the first N questions")
        p.add_argument("--max-new-tokens", type=int, default=48, help="answer length limit")
        p.add_argument("--batch-size", type=int, default=8, help="questions generated together")


def main(args: argparse.Namespace) -> int:
    if args.action == "run":
        bad = [o for o in args.overrides if "=" not in o]
        if bad:
            raise ConfigError(f"expected key=value after the recipe, got {bad[0]!r}")
        print(medical.run_medical_recipe(args.recipe, args.overrides, args.questions, args.max_questions,
                                         args.max_new_tokens, args.batch_size))
        return 0
    questions = medical.load_kg_questions(args.questions, args.max_questions)
    bot = load(args.model, adapter=args.adapter, template=args.template)
    metrics, records = medical.evaluate_kg(bot, questions, args.batch_size, args.max_new_tokens)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        medical.write_records(out, records, metrics)
    print(medical.medical_table({args.adapter or args.model: {"kg": metrics}}))
    return 0

"""lm-evaluation-harness on finechat models: standard benchmarks (MMLU, C-Eval, CMMLU, GSM8K, ...) and task files.

lm-eval loads models through its own backends; a fine-tune is judged on the model finechat loaded (base, peft
adapter, quantized, native ChatGLM-6B, a GGUF on the llama.cpp engine), so :func:`harness_model` hands lm-eval
a model object: a subclass of lm-eval's ``TemplateLM`` whose ``loglikelihood`` scores context + continuation with
the engine's ``score_batch`` (PyTorch: :mod:`finechat.generate.scoring`, right-padded batches of
``batch_size``; llama.cpp: :mod:`finechat.generate.llamacpp_logprobs`), ``loglikelihood_rolling`` scores
lm-eval's rolling windows, and ``generate_until`` decodes greedily with ``ChatModel.generate_ids`` (the fast
path where there is one) up to the task's stop strings. Tokenization follows lm-eval's ``hf`` backend (the
tokenizer's own special tokens unless the text already starts with BOS; the BOS, else EOS, token as the
context of an empty one), so numbers match ``lm_eval --model hf`` on the same (merged) folder.
Native ChatGLM-6B is a prefix LM: the context is encoded with its ``[gMASK]<sop>`` and the continuation
follows ``<sop>`` the way an answer does.

Tasks are lm-eval names (its registry, which downloads data) or task files: a ``.yaml`` path, or a folder of
them. A task file's ``dataset_kwargs.data_files`` may be relative to the working directory or to any folder
above the file (so the project's own ``data/tasks/finechat_mc`` runs from anywhere). A task whose data
cannot be fetched (offline) fails with one line naming the task, its dataset and how to use a local copy.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from finechat.errors import ConfigError, FinechatError
from finechat.eval.metrics import format_table
from finechat.files import write_text_atomic
from finechat.generate.chat_loader import load as load_chat_model
from finechat.generate.contract import ChatEngine
from finechat.generate.engine import GenerationSettings

MISSING_EXTRA = "lm-evaluation-harness is not installed: pip install 'finechat[bench]'"
DEFAULT_MAX_LENGTH = 2048  # lm-eval's hf backend's default when the config names no context length


def _lm_eval() -> Any:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ConfigError(MISSING_EXTRA) from None
    import lm_eval.api.model

    return lm_eval


@functools.cache
def _model_class() -> type:
    """The ``TemplateLM`` subclass (built on first use: lm-eval is an optional, heavy import)."""
    _lm_eval()
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import _add_special_kwargs, handle_stop_sequences, has_bos_prefix
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    from tqdm import tqdm

    class FinechatLM(TemplateLM):
        """lm-eval's model interface over a finechat :class:`~finechat.generate.engine.ChatModel`."""

        def __init__(self, chat: ChatEngine, batch_size: int = 8, max_length: int | None = None,
                     add_bos_token: bool | None = None):
            super().__init__()
            self.chat, self.tokenizer, self.batch_size = chat, chat.tokenizer, max(1, int(batch_size))
            self.add_bos_token = add_bos_token
            config = getattr(chat.model, "config", None)
            self.glm = getattr(config, "model_type", None) == "chatglm"
            context = next((getattr(config, n) for n in ("max_position_embeddings", "seq_length", "n_positions")
                            if isinstance(getattr(config, n, None), int)), None)
            self.max_length = max_length or context or DEFAULT_MAX_LENGTH

        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_token_id

        @property
        def prefix_token_id(self) -> int:
            bos = self.tokenizer.bos_token_id
            return bos if bos is not None and not self.glm else self.tokenizer.eos_token_id

        @property
        def tokenizer_name(self) -> str:
            return str(getattr(self.tokenizer, "name_or_path", "finechat")).replace("/", "__")

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
            special = _add_special_kwargs(add_special_tokens, self.add_bos_token)
            bos = self.tokenizer.bos_token_id
            if add_special_tokens is None and bos is not None and has_bos_prefix(string, self.tokenizer.decode(bos)):
                special["add_special_tokens"] = False
            return self.tokenizer.encode(string, **special)

        def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            if not self.glm:
                return super()._encode_pair(context, continuation)
            spaces = len(context) - len(context.rstrip())  # as lm-eval does: trailing spaces go with the answer
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            return (self.tokenizer.encode(context, add_special_tokens=True),
                    self.tokenizer.encode(continuation, add_special_tokens=False))

        def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, override_bs: int | None = None,
                                  **kwargs: Any) -> list[tuple[float, bool]]:
            items = []
            for key, context, continuation in requests:
                sequence = (list(context) + list(continuation))[-(self.max_length + 1):]
                items.append((key, sequence, len(sequence) - len(continuation)))
            order = sorted(range(len(items)), key=lambda i: -len(items[i][1]))  # similar lengths pad little
            size = override_bs or self.batch_size
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
            results: list[Any] = [None] * len(items)
            batches = [order[i:i + size] for i in range(0, len(order), size)]
            for batch in tqdm(batches, desc="log-likelihoods", disable=disable_tqdm):
                scores = self.chat.score_batch([items[i][1] for i in batch], [items[i][2] for i in batch],
                                               pad_id=pad)
                for i, token_scores in zip(batch, scores):
                    result = (float(sum(s.logprob for s in token_scores)), all(s.greedy for s in token_scores))
                    results[i] = result
                    if items[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", items[i][0], result)
            return results

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
            out = []
            for request in tqdm(requests, desc="rolling log-likelihoods", disable=disable_tqdm):
                (string,) = request.args
                windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)]
                scores = self._loglikelihood_tokens([(None, c, x) for c, x in windows], disable_tqdm=True)
                total = sum(s for s, _ in scores)
                self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
                out.append(total)
            return out

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
            out = []
            eos = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
            stop_ids = set(self.chat.stop_token_ids()) | {self.eot_token_id}
            for request in tqdm(requests, desc="generating", disable=disable_tqdm):
                context, gen_kwargs = request.args
                kwargs = dict(gen_kwargs or {})
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                max_new = int(kwargs.pop("max_gen_toks", 256))
                sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature", 0) or 0) > 0
                settings = GenerationSettings.from_kwargs(
                    None, max_new_tokens=max_new, do_sample=sample, greedy=not sample,
                    temperature=float(kwargs.get("temperature", 1.0) or 1.0), top_p=float(kwargs.get("top_p", 1.0)),
                    repetition_penalty=1.0, seed=kwargs.get("seed"))
                ids = self.tok_encode(context)[-max(1, self.max_length - max_new):]
                text = self._generate(ids, settings, until, stop_ids)
                self.cache_hook.add_partial("generate_until", request.args, text)
                out.append(text)
            return out

        def _generate(self, ids: list[int], settings: GenerationSettings, until: list[str], stop_ids: set) -> str:
            new: list[int] = []
            steps = self.chat.generate_ids(ids, settings)
            try:
                for step in steps:
                    ended = any(t in stop_ids for t in step)
                    new.extend(t for t in step if t not in stop_ids)
                    if ended or any(s in self.tokenizer.decode(new, skip_special_tokens=True) for s in until):
                        break
            finally:
                steps.close()
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            for s in until:
                if s:
                    text = text.split(s)[0]
            return text

    return FinechatLM


def harness_model(chat: ChatEngine, batch_size: int = 8, max_length: int | None = None) -> Any:
    """An lm-eval model (``lm_eval.api.model.TemplateLM``) over a loaded finechat ``ChatModel``."""
    return _model_class()(chat, batch_size=batch_size, max_length=max_length)


# -- tasks ------------------------------------------------------------------------------------------------
def resolve_tasks(spec: str | list[str]) -> list[str | dict]:
    """``--tasks`` as lm-eval task specs: names stay names, ``.yaml`` files and folders of them become configs."""
    words = [w.strip() for w in (spec.split(",") if isinstance(spec, str) else spec) if w.strip()]
    if not words:
        raise ConfigError("--tasks names no task")
    out: list[str | dict] = []
    for word in words:
        path = Path(word).expanduser()
        if path.suffix in (".yaml", ".yml") or path.is_dir():
            files = sorted(p for p in path.glob("*.y*ml") if not p.name.startswith("_")) if path.is_dir() else [path]
            if not path.exists() or not files:
                raise ConfigError(f"--tasks {word}: no such task file (a .yaml file or a folder of them)")
            out.extend(task_config(f) for f in files)
        else:
            out.append(word)
    return out


def task_config(path: Path) -> dict:
    """A task file as an lm-eval config, its local data files made absolute."""
    try:
        config = _load_yaml(path)
    except Exception as e:  # noqa: BLE001  a YAML or include error: one line naming the file
        raise ConfigError(f"{path}: not a readable lm-eval task file ({type(e).__name__}: {e})") from None
    if "task" not in config:
        raise ConfigError(f"{path}: field 'task' is missing (an lm-eval task file names its task)")
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, (str, list, dict)):
        config["dataset_kwargs"]["data_files"] = _absolute(files, path)
    return config


def _load_yaml(path: str | Path) -> dict:
    """A task file with its ``include`` files merged, read the way lm-eval reads it."""
    _lm_eval()
    from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval 0.4.10+; no public name for it

    return load_yaml(path)


def _absolute(files: Any, task_file: Path) -> Any:
    if isinstance(files, dict):
        return {k: _absolute(v, task_file) for k, v in files.items()}
    if isinstance(files, list):
        return [_absolute(v, task_file) for v in files]
    if "://" in files or Path(files).is_absolute() or Path(files).exists():
        return str(Path(files).resolve()) if Path(files).exists() else files
    for folder in [task_file.resolve().parent, *task_file.resolve().parents]:
        if (folder / files).exists():
            return str(folder / files)
    raise ConfigError(f"{task_file}: data file {files} not found (relative to the working directory or to a "
                      "folder above the task file)")


def check_tasks(tasks: list[str | dict]) -> None:
    """Load each task once so that one whose data cannot be fetched fails with one clear line."""
    _lm_eval()
    from lm_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager() if any(isinstance(t, str) for t in tasks) else TaskManager(include_defaults=False)
    for task in tasks:
        name = task if isinstance(task, str) else task["task"]
        if isinstance(task, str) and task not in manager.all_tasks:
            raise ConfigError(f"--tasks {task}: lm-eval has no task or group of that name (see lm_eval ls tasks), "
                              "and it is not a .yaml file")
        try:
            get_task_dict([task], manager)
        except Exception as e:  # noqa: BLE001  datasets / hub errors differ by version: report them all alike
            dataset = _dataset_of(manager, task)
            raise FinechatError(
                f"task {name}: its dataset {dataset} cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0]}"
                f"); offline, point the task at a local copy: copy its yaml, set dataset_path: json and "
                f"dataset_kwargs: {{data_files: {{test: FILE.jsonl}}}}, and pass --tasks that.yaml") from None


def _dataset_of(manager: Any, task: str | dict) -> str:
    if isinstance(task, dict):
        return str(task.get("dataset_path", "?"))
    try:
        path = getattr(manager.task_index.get(task), "yaml_path", None)
        config = _load_yaml(path) if path else {}
        return str(config.get("dataset_path") or "(a group of tasks)")
    except Exception:  # noqa: BLE001  naming the dataset is a courtesy; the task name is already there
        return "(unknown)"


# -- running --------------------------------------------------------------------------------------------
def evaluate(chat: ChatEngine, tasks: list[str | dict], limit: float | None = None, num_fewshot: int | None = None,
             batch_size: int = 8, seed: int = 1234, check: bool = True) -> dict:
    """lm-eval's results for ``chat`` on ``tasks`` (``results``, ``versions``, ``n-shot``, ``configs``...)."""
    _lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    if check:  # one clear line for a task whose data cannot be loaded (callers that checked already skip it)
        check_tasks(tasks)
    manager = TaskManager() if any(isinstance(t, str) for t in tasks) else TaskManager(include_defaults=False)
    results = simple_evaluate(model=harness_model(chat, batch_size=batch_size), tasks=list(tasks),
                              num_fewshot=num_fewshot, limit=limit, task_manager=manager, log_samples=False,
                              random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                              fewshot_random_seed=seed, bootstrap_iters=0)
    if results is None:  # pragma: no cover - only on non-zero ranks of a distributed run
        raise FinechatError("lm-eval returned no results")
    return results


def scores(results: dict) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from lm-eval's results (filters after a comma dropped when only 'none')."""
    out: dict[str, dict[str, float]] = {}
    for task, values in results.get("results", {}).items():
        row = {}
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if metric in ("alias", "samples", "sample_len") or "_stderr" in metric or not isinstance(value, (int, float)):
                continue
            row[metric if filt in ("none", "") else f"{metric} ({filt})"] = float(value)
        out[task] = row
    return out


def results_table(results: dict) -> str:
    """lm-eval's own Markdown table of results."""
    from lm_eval.utils import make_table

    return make_table(results)


def compare_table(runs: dict[str, dict]) -> str:
    """Several entries side by side: one row per task and metric, one column per entry."""
    per_entry = {name: scores(r) for name, r in runs.items()}
    rows: dict[str, dict] = {}
    for name, table in per_entry.items():
        for task, metrics in table.items():
            for metric, value in metrics.items():
                rows.setdefault(f"{task} {metric}", {})[name] = f"{value:.4f}"
    return format_table(rows, columns=list(per_entry), first="task metric")


def write_results(results: dict, path: str | Path, info: dict | None = None) -> Path:
    """lm-eval's results as JSON (what its own ``--output_path`` keeps: results, versions, n-shot, configs)."""
    from lm_eval.utils import handle_non_serializable

    keep = {k: results[k] for k in ("results", "groups", "group_subtasks", "configs", "versions", "n-shot",
                                    "higher_is_better", "n-samples") if k in results}
    keep["finechat"] = info or {}
    path = Path(path)
    write_text_atomic(path, json.dumps(keep, indent=2, ensure_ascii=False, default=handle_non_serializable) + "\n")
    return path


def evaluate_entries(entries: list[Any], tasks: list[str | dict], load_options: dict, output_dir: str | Path,
                     **options: Any) -> dict[str, dict]:
    """lm-eval results of each ``--compare`` entry (base, adapter or model folder), each loaded in turn; each
    entry's JSON goes to ``output_dir/NAME/lm_eval_results.json``."""
    runs = {}
    check_tasks(tasks)  # a missing dataset fails before any model is loaded
    for entry in entries:
        if getattr(entry, "predictions", None):
            raise ConfigError(f"--compare {entry.predictions}: --tasks compares models and adapters, "
                              "not predictions files")
        bot = load_chat_model(entry.model, adapter=entry.adapter, **load_options)
        runs[entry.name] = evaluate(bot, tasks, check=False, **options)
        del bot
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in entry.name).strip("._") or "entry"
        write_results(runs[entry.name], Path(output_dir) / safe / "lm_eval_results.json",
                      {"model": entry.model, "adapter": entry.adapter})
    return runs

"""vLLM as an engine: finechat's prompts, stop rules and API in front, vLLM's scheduler and kernels behind.

``finechat.load(model, engine="vllm")`` (``--engine vllm`` on chat / serve / web / eval) returns a
:class:`VllmChatModel`. It starts vLLM's OpenAI server as a child process on a free 127.0.0.1 port
(:mod:`finechat.generate.vllm_server`: a separate virtualenv that ``make vllm`` builds, started and always
stopped by finechat) and talks to it over HTTP. Everything the user sees stays finechat's: the prompt is rendered
with finechat's template and tokenized by finechat's tokenizer, and the *token ids* go to vLLM's
``/v1/completions`` (so vLLM's own chat template is never used and prompts are exactly those of the PyTorch
engine); the answer comes back as token ids and passes through ``ChatModel.stream_text`` (stop tokens, stop
strings, post-processing, tools, ChatGLM's api.py format, the medical demo). Only :meth:`generate_ids` and the
two scoring methods change.

Mapped one to one: greedy (temperature 0), temperature, top_p, top_k, repetition / presence / frequency
penalty, seed (vLLM seeds each request: a seeded answer repeats), the stop token ids, max tokens. Streaming is
vLLM's server-sent events; closing the token iterator closes the HTTP stream, and vLLM aborts a request whose
client went away (cancellation). Log-probabilities come from vLLM's ``prompt_logprobs`` over the whole sequence
(its raw log-softmax, as finechat's own scorer computes). Requests are not serialized here: vLLM batches
concurrent requests itself (continuous batching over a paged KV cache).

Models: a Hugging Face folder (``default`` is finechat's converted default model), a merged export, or base +
adapter. A plain LoRA adapter goes to vLLM's own LoRA support (``--enable-lora --lora-modules``); other
adapters (LoRA with ``modules_to_save`` or DoRA, a finechat full / freeze checkpoint) are merged into a
temporary folder first. Architectures vLLM has no implementation of (ChatGLM-6B v1) are refused by name before
anything starts, and so are prefix adapters (P-Tuning v2), which vLLM cannot run.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
import types
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from finechat.console import log
from finechat.errors import ConfigError, FinechatError, ModelLoadError
from finechat.files import read_json
from finechat.generate.engine import ChatModel
from finechat.generate.scoring import TokenScore
from finechat.generate.settings import GenerationSettings
from finechat.generate.vllm_server import START_TIMEOUT, VllmServer, find_vllm_python
from finechat.models.device import pick_device
from finechat.models.resolve import load_adapter, load_model_and_tokenizer, resolve_model_path

SERVED_NAME = "finechat"
ADAPTER_NAME = "finechat-adapter"
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the --max-lora-rank values vLLM accepts
CPU_KV_CACHE_BYTES = 2 << 30  # the KV cache vLLM keeps on a CPU (SmolLM2-135M: ~45k tokens)
READ_TIMEOUT = 900.0  # seconds between two streamed chunks before the request is given up (a long prefill on a CPU)


def refuse_unsupported(config: dict, folder: Path) -> None:
    """Architectures vLLM lacks, by name, before anything starts (vLLM would fail after a minute of start-up)."""
    model_type = config.get("model_type")
    if model_type == "chatglm" and "multi_query_attention" not in config:
        raise ModelLoadError(
            f"{folder}: ChatGLM-6B (v1, model_type chatglm) has no vLLM implementation (vLLM's ChatGLM is ChatGLM2/3 "
            "and GLM-4); run it on finechat's own engine (--engine torch)")


def lora_rank_bucket(rank: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds ``rank``."""
    for bucket in LORA_RANKS:
        if rank <= bucket:
            return bucket
    raise ModelLoadError(f"LoRA rank {rank} is above vLLM's largest supported rank ({LORA_RANKS[-1]})")


def vllm_can_load_lora(adapter_config: dict) -> bool:
    """A plain LoRA that vLLM's LoRA layers apply as peft does (anything else is merged first)."""
    return (adapter_config.get("peft_type") == "LORA" and not adapter_config.get("modules_to_save")
            and not adapter_config.get("use_dora") and not adapter_config.get("use_rslora")
            and not adapter_config.get("layers_to_transform") and not adapter_config.get("rank_pattern")
            and not adapter_config.get("alpha_pattern"))


def merge_adapter(model: str, adapter: str, trust_remote_code: bool) -> Path:
    """Base + adapter merged into a temporary Hugging Face folder in float32 (removed when the engine stops)."""
    path = Path(adapter).expanduser()
    config = read_json(path / "adapter_config.json") if (path / "adapter_config.json").is_file() else {}
    if config.get("peft_type") in ("PREFIX_TUNING", "P_TUNING", "PROMPT_TUNING") or (
            not config and (path / "pytorch_model.bin").is_file()):
        raise ModelLoadError(f"adapter {adapter}: prefix / prompt tuning (P-Tuning v2) cannot be merged into weights "
                             "and vLLM has no support for it; run it on finechat's own engine (--engine torch)")
    hf_model, tokenizer, _ = load_model_and_tokenizer(model, dtype="float32", device="cpu",
                                                      trust_remote_code=trust_remote_code)
    hf_model = load_adapter(hf_model, adapter)
    if hasattr(hf_model, "merge_and_unload"):
        hf_model = hf_model.merge_and_unload()
    out = Path(tempfile.mkdtemp(prefix="finechat-vllm-merged-"))
    log(f"Merging {adapter} into its base for vLLM ({out}) ...")
    hf_model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


class VllmModel:
    """What the rest of finechat asks of ``ChatModel.model``: ``config``, ``generation_config`` and the server."""

    def __init__(self, server: VllmServer, config: dict, generation_config: Any, served_name: str):
        self.server, self.served_name = server, served_name
        self.config = types.SimpleNamespace(model_type=config.get("model_type"), engine="vllm",
                                            max_position_embeddings=config.get("max_position_embeddings"))
        self.generation_config = generation_config
        self.temp_folder: Path | None = None
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            import httpx

            self._client = httpx.Client(base_url=self.server.url, timeout=httpx.Timeout(READ_TIMEOUT, connect=10),
                                        limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        self.server.stop()
        if self.temp_folder is not None:  # a merged copy made for vLLM
            shutil.rmtree(self.temp_folder, ignore_errors=True)

    def dead(self) -> FinechatError:
        """The error for a request that failed because the child stopped (or cut the answer short)."""
        if self.server.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):  # a dying child takes a moment to be reaped
                self.server.process.wait(timeout=2)
        if not self.server.alive():
            code = self.server.process.poll() if self.server.process else None
            return FinechatError(f"the vLLM server stopped (exit code {code}): {self.server.exit_reason()}")
        return FinechatError(f"the vLLM server on {self.server.url} broke off the answer (see {self.server.log_path})")

    def post(self, body: dict) -> dict:
        """POST /v1/completions (not streamed); vLLM's error message, or the child's death, as one line."""
        import httpx

        try:
            response = self.client.post("/v1/completions", json=body)
        except httpx.HTTPError as e:
            raise self.dead() from e
        if response.status_code != 200:
            raise FinechatError(f"vLLM: {_error_message(response.text)}")
        return response.json()

    def stream(self, body: dict) -> Iterator[dict]:
        """POST /v1/completions with ``stream: true``: each server-sent event's JSON; closing stops the request."""
        import httpx

        try:
            with self.client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
                if response.status_code != 200:
                    raise FinechatError(f"vLLM: {_error_message(response.read().decode('utf-8', 'replace'))}")
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    event = json.loads(data)
                    if "error" in event:
                        raise FinechatError(f"vLLM: {_error_message(data)}")
                    yield event
        except httpx.HTTPError as e:
            raise self.dead() from e
        raise self.dead()  # the stream ended without vLLM's closing [DONE]


def _error_message(text: str) -> str:
    try:
        body = json.loads(text)
        error = body.get("error", body)
        return str(error.get("message", error) if isinstance(error, dict) else error).splitlines()[0][:400]
    except (ValueError, AttributeError):
        return text.strip().splitlines()[0][:400] if text.strip() else "(empty answer)"


class VllmChatModel(ChatModel):
    """A :class:`ChatModel` whose tokens and scores come from a vLLM server child (``.model.server``)."""

    engine = "vllm"
    concurrent = True  # vLLM batches concurrent requests itself: the server's scheduler passes them all through

    def __init__(self, model: VllmModel, tokenizer: Any, template: Any = None, source: str | None = None):
        super().__init__(model, tokenizer, template, source=source)

    def __enter__(self) -> VllmChatModel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop the vLLM child now (it is also stopped at exit and when this object is collected)."""
        self.model.close()

    # -- token generation ----------------------------------------------------------------------------
    def request_body(self, input_ids: list[int], settings: GenerationSettings) -> dict:
        """vLLM's /v1/completions body for finechat's settings (token ids in, token ids out)."""
        max_new = settings.max_new_tokens_for(len(input_ids))
        limit = self.model.config.max_position_embeddings
        if limit:
            if len(input_ids) >= limit:
                raise FinechatError(f"the prompt has {len(input_ids)} tokens; the model's context holds {limit}")
            max_new = min(max_new, limit - len(input_ids))
        greedy = not settings.do_sample
        body = {
            "model": self.model.served_name, "prompt": input_ids, "max_tokens": max_new,
            "temperature": 0.0 if greedy else settings.temperature, "top_p": 1.0 if greedy else settings.top_p,
            "top_k": 0 if greedy else settings.top_k,  # vLLM: 0 = off, as finechat
            "repetition_penalty": settings.repetition_penalty, "presence_penalty": settings.presence_penalty,
            "frequency_penalty": settings.frequency_penalty, "stop_token_ids": self.stop_token_ids(),
            "return_token_ids": True, "skip_special_tokens": False,
        }
        if settings.seed is not None:
            body["seed"] = settings.seed
        return body

    def generate_ids(self, input_ids: list[int], settings: GenerationSettings,
                     cancelled: Callable[[], bool] | None = None) -> Iterator[list[int]]:
        """Yield new token ids streamed from vLLM; closing the iterator, or ``cancelled()`` saying True at the
        next event, closes the stream (vLLM aborts the request, its prefill included)."""
        events = self.model.stream(self.request_body(list(input_ids), settings))
        stop_ids = set(self.stop_token_ids())
        sent_stop = False
        try:
            for event in events:
                if cancelled is not None and cancelled():
                    return
                for choice in event.get("choices", []):
                    ids = [int(t) for t in choice.get("token_ids") or []]
                    if ids:
                        sent_stop = sent_stop or any(t in stop_ids for t in ids)
                        yield ids
                    # vLLM ends at a stop token without always listing it: hand it on, so the answer ends as on
                    # the PyTorch engine (finish_reason "stop", the stop token counted)
                    if choice.get("finish_reason") == "stop" and not sent_stop:
                        reason = choice.get("stop_reason")
                        stop = reason if isinstance(reason, int) else self.tokenizer.eos_token_id
                        if isinstance(stop, int):
                            sent_stop = True
                            yield [stop]
        finally:
            events.close()

    # -- scores (log-probabilities) --------------------------------------------------------------------
    def scorer(self, top_n: int = 0) -> VllmScorer:
        """A scorer of one growing sequence through vLLM's ``prompt_logprobs``."""
        return VllmScorer(self, top_n)

    def score_batch(self, sequences: list[list[int]], starts: list[int], pad_id: int = 0) -> list[list[TokenScore]]:
        """Scores of ``sequences[i][starts[i]:]``, all sequences in one request (vLLM batches them)."""
        rows = self.prompt_scores([list(map(int, s)) for s in sequences], 0)
        return [scores[start:] for scores, start in zip(rows, starts)]

    def prompt_scores(self, sequences: list[list[int]], top_n: int) -> list[list[TokenScore]]:
        """One ``TokenScore`` per token of each sequence (the first has no log-probability), from vLLM."""
        if not sequences:
            return []
        body = {"model": self.model.served_name, "prompt": sequences, "max_tokens": 1, "temperature": 0.0,
                "prompt_logprobs": top_n}
        choices = sorted(self.model.post(body)["choices"], key=lambda c: c["index"])
        return [_token_scores(ids, choice.get("prompt_logprobs") or [], top_n) for ids, choice in zip(sequences, choices)]


def _token_scores(ids: list[int], rows: list, top_n: int) -> list[TokenScore]:
    scores = [TokenScore(ids[0], None, [], True)]
    for token, row in zip(ids[1:], rows[1:]):
        entries = {int(k): v for k, v in (row or {}).items()}
        own = entries.get(token)
        if own is None:
            raise FinechatError(f"vLLM returned no log-probability for token {token}")
        ranked = sorted(((t, v) for t, v in entries.items() if v.get("rank") is not None), key=lambda e: e[1]["rank"])
        top = [(t, float(v["logprob"])) for t, v in ranked[:top_n]] if top_n else []
        scores.append(TokenScore(token, float(own["logprob"]), top, own.get("rank") == 1))
    return scores


class VllmScorer:
    """Scores the tokens of one growing sequence (the interface of ``generate.scoring.Scorer``): each ``extend``
    scores the whole sequence again on vLLM (its prefix cache keeps the repeated part cheap)."""

    def __init__(self, chat: VllmChatModel, top_n: int = 0):
        self.chat, self.top_n = chat, top_n
        self.ids: list[int] = []

    def extend(self, new_ids: list[int]) -> list[TokenScore]:
        new_ids = [int(t) for t in new_ids]
        if not new_ids:
            return []
        full = self.ids + new_ids
        scores = self.chat.prompt_scores([full], self.top_n)[0][len(self.ids):]
        self.ids = full
        return scores


def vllm_dtype(dtype: str, device: str) -> str:
    """finechat's dtype for vLLM: ``auto`` is float32 on a CPU (vLLM's bfloat16 CPU kernels need AVX512-BF16 and
    gave garbage on an AVX2 machine), the model's own dtype on a GPU."""
    if dtype == "auto":
        return "float32" if device == "cpu" else "auto"
    return dtype


def load_vllm(model: str = "default", adapter: str | None = None, template: str | None = None, dtype: str = "auto",
              device: str = "auto", trust_remote_code: bool = False, port: int = 0,
              start_timeout: float = START_TIMEOUT, vllm_args: list[str] | None = None,
              **generation: Any) -> VllmChatModel:
    """Start vLLM on ``model`` (+ ``adapter``) and return its :class:`VllmChatModel` (``finechat.load(..., engine="vllm")``).

    ``vllm_args`` are extra flags for vLLM's server (``--max-model-len 4096``, ``--gpu-memory-utilization 0.8``).
    The child stops with ``close()``, a ``with`` block, at exit, or when the engine is collected.
    """
    folder, gguf_file = resolve_model_path(model)
    if gguf_file:
        raise ModelLoadError(f"{model}: the vLLM engine runs Hugging Face folders, not GGUF files (give the folder; "
                             "finechat's default model is converted to one: --model default)")
    config = read_json(folder / "config.json")
    refuse_unsupported(config, folder)
    device = pick_device(device)
    if device == "mps":
        raise ConfigError("device mps: vLLM runs on CUDA GPUs and CPUs")
    python = find_vllm_python()
    from transformers import AutoTokenizer, GenerationConfig

    if adapter and template is None:  # the template the adapter was trained with (finechat checkpoints record it)
        run_file = Path(adapter).expanduser() / "finechat_run.json"
        template = read_json(run_file).get("template") if run_file.is_file() else None
    serve_folder, served_name, temp_folder = folder, SERVED_NAME, None
    args = ["--dtype", vllm_dtype(dtype, device), "--served-model-name", SERVED_NAME, "--generation-config", "vllm",
            "--seed", "0", "--uvicorn-log-level", "warning"]
    if device == "cpu":
        args.append("--enforce-eager")  # compiling takes 4-8 minutes on a CPU and its cache does not reload
        if not any(a.startswith("--kv-cache-memory-bytes") for a in vllm_args or []):
            # on a CPU vLLM otherwise reserves --gpu-memory-utilization (0.92) of all memory up front and refuses to
            # start when other processes use more than 8% of it
            args += ["--kv-cache-memory-bytes", str(CPU_KV_CACHE_BYTES)]
    if trust_remote_code:
        args.append("--trust-remote-code")
    if adapter:
        adapter_path = Path(adapter).expanduser()
        if not adapter_path.is_dir():
            raise ModelLoadError(f"adapter folder not found: {adapter}")
        adapter_config = read_json(adapter_path / "adapter_config.json") if (
            adapter_path / "adapter_config.json").is_file() else {}
        if vllm_can_load_lora(adapter_config):
            rank = lora_rank_bucket(int(adapter_config.get("r", 8)))
            args += ["--enable-lora", "--max-loras", "1", "--max-lora-rank", str(rank),
                     "--lora-modules", f"{ADAPTER_NAME}={adapter_path.resolve()}"]
            served_name = ADAPTER_NAME
        else:
            temp_folder = serve_folder = merge_adapter(model, adapter, trust_remote_code)
    args += list(vllm_args or [])
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{folder}: cannot load the tokenizer: {e}") from e
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    generation_config = GenerationConfig.from_pretrained(folder) if (folder / "generation_config.json").is_file() \
        else None
    server = VllmServer(serve_folder, args, python=python, port=port, start_timeout=start_timeout)
    try:
        server.start()
    except BaseException:
        if temp_folder is not None:
            shutil.rmtree(temp_folder, ignore_errors=True)
        raise
    vllm_model = VllmModel(server, config, generation_config, served_name)
    vllm_model.temp_folder = temp_folder
    try:  # the context vLLM actually gives (--max-model-len may cap it below the model's own)
        listed = vllm_model.client.get("/v1/models").json().get("data", [])
        vllm_model.config.max_position_embeddings = next(
            (m["max_model_len"] for m in listed if m.get("id") == served_name and m.get("max_model_len")),
            vllm_model.config.max_position_embeddings)
    except Exception:  # noqa: BLE001  informative only: the model's own context stays the limit
        pass
    bot = VllmChatModel(vllm_model, tokenizer, template, source=str(folder))
    weakref.finalize(bot, vllm_model.close)
    if temp_folder is not None:  # also at exit, should the engine live until then
        weakref.finalize(vllm_model, shutil.rmtree, temp_folder, True)
    if generation:
        bot.generation = GenerationSettings.from_kwargs(bot.generation, **generation)
    return bot

"""Continuous batching for the server: concurrent requests share the same forward passes.

One scheduler thread owns the model. Each loop it admits waiting requests (prompts that arrived together
are prefilled side by side, left-padded, in one forward pass; their KV cache is then left-padded into the
running batch cache), drops requests whose consumer went away, and
runs one decode step for every active sequence at once: ``[batch, 1]`` new tokens against a padded
``DynamicCache`` of ``[batch, kv_heads, length, head_dim]`` per layer plus a ``[batch, length]``
attention mask, with per-sequence position ids. A sequence leaves the batch as soon as it ends (stop
token, token limit, or its consumer closed the stream) and a new one may join at the next step, so total
tokens/s grows with the number of clients.

Why our own loop rather than transformers' ``generate``: ``generate`` runs one fixed batch from start to
end, so a request arriving mid-way would wait for the slowest answer; transformers' own continuous
batching (``generate_batch``) needs paged attention kernels and does not stream through our stop logic.
The loop is small and reuses the engine's pieces: :meth:`BatchScheduler.generate_ids` has the same
contract as :meth:`ChatModel.generate_ids` (an iterator of token-id lists; closing it cancels), so
``ChatModel.stream_text(..., generate=scheduler.generate_ids)`` applies the same stop tokens, stop strings
and post-processing as ``chat``. Greedy decoding takes the argmax of the same logits as ``generate`` does.

A request that is alone runs on the engine's fast batch-1 decoder (``finechat.generate.fast``, the one
in-process ``chat`` uses), so one client gets in-process speed; when a second request arrives, the first
moves into the batch where it left off (its prompt and answer so far are prefilled into a batch cache).

Slow readers never stall the loop: tokens go into each request's own unbounded queue (a few ints). A
request whose stream is closed is dropped before the next step. The waiting queue is bounded:
:class:`QueueFull` tells the server to answer 429 with a Retry-After.

Models that cannot share a padded cache (no ``nn.Module``, prefix-tuning adapters that inject their own
past key values, cache layers other than plain ``DynamicLayer`` such as sliding windows, or custom
architectures like native ChatGLM-6B) run one request at a time through ``ChatModel.generate_ids``, still
behind the bounded queue; a client that leaves stops that one inside its prefill too (``cancelled``).
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

from finechat.errors import FinechatError
from finechat.generate.admission import Reservation
from finechat.generate.contract import ChatEngine
from finechat.generate.fast import fast_decoder_for, generate_tokens
from finechat.generate.sampling import next_token
from finechat.generate.settings import GenerationSettings

PREFILL_TOKENS = 2048  # most padded prompt tokens prefilled in one forward pass when requests arrive together
PREFILL_CHUNK = 512  # positions per prefill pass: between passes, a prefill whose clients all left stops


class QueueFull(FinechatError):
    """Too many requests are waiting; the client should retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int = 2):
        super().__init__(message)
        self.retry_after = retry_after


class SchedulerClosed(FinechatError):
    """The scheduler was shut down (the server is stopping)."""


_END = object()


@dataclasses.dataclass(eq=False)
class _Sequence:
    prompt_ids: list[int]
    settings: GenerationSettings
    max_new: int
    out: queue.Queue = dataclasses.field(default_factory=queue.Queue)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    generated: list[int] = dataclasses.field(default_factory=list)
    generator: Any = None  # torch.Generator when the request has a seed
    submitted: float = dataclasses.field(default_factory=time.monotonic)


class Stream:
    """Token ids of one request as they are generated; ``close()`` (or leaving a ``for`` loop) cancels it."""

    def __init__(self, seq: _Sequence, on_close: Any = None):
        self._seq = seq
        self._on_close = on_close
        self._done = False

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> list[int]:
        if self._done:
            raise StopIteration
        item = self._seq.out.get()
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return item

    def close(self) -> None:
        self._seq.cancelled.set()
        self._done = True
        if self._on_close is not None:
            self._on_close()
            self._on_close = None

    def __del__(self) -> None:  # a consumer that vanished must not keep generating
        self._seq.cancelled.set()


class BatchScheduler:
    """Runs concurrent generation requests of one :class:`ChatModel` in shared forward passes."""

    def __init__(self, chat: ChatEngine, max_batch_size: int = 16, max_queue: int = 64):
        if max_batch_size < 1 or max_queue < 0:
            raise ValueError("max_batch_size must be >= 1 and max_queue >= 0")
        self.chat = chat
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.batched = _can_batch(chat.model)
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._active: list[_Sequence] = []
        self._cond = threading.Condition()
        self._closed = False
        self._serial_running = 0
        self._thread: threading.Thread | None = None
        # (sequence, token iterator) while one request runs alone on the engine's fast batch-1 decoder
        self._solo: tuple[_Sequence, Any] | None = None
        # Padded batch state, owned by the scheduler thread.
        self._cache: Any = None
        self._mask: Any = None  # [batch, length] 1 = real token, 0 = left padding
        self._positions: Any = None  # [batch] position id of the next token
        self._last: Any = None  # [batch] last sampled token
        self.steps = 0  # decode steps run (for tests and stats)
        self.tokens = 0  # tokens generated in all
        self._joining = 0  # taken off the queue, not yet in the batch (counted by submit's admission check)
        self._reserved = 0  # places held by reserve() and not yet used

    # -- public ----------------------------------------------------------------------------------------
    @property
    def active(self) -> int:
        return len(self._active) + self._serial_running + (self._solo is not None)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def generate_ids(self, input_ids: list[int], settings: GenerationSettings) -> Iterator[list[int]]:
        """Same contract as ``ChatModel.generate_ids``: yields new token ids; closing the iterator cancels."""
        stream = self.submit(input_ids, settings)
        try:
            yield from stream
        finally:
            stream.close()

    def submit(self, input_ids: list[int], settings: GenerationSettings, reserved: bool = False) -> Stream:
        """Queue a request; raises :class:`QueueFull` at once when the queue is full (``reserved``: it takes a
        place held by :meth:`reserve` instead, which is never refused)."""
        seq = _Sequence(list(input_ids), settings, settings.max_new_tokens_for(len(input_ids)))
        if not self.batched:
            return self._submit_serial(seq, reserved)
        with self._cond:
            if self._closed:
                raise SchedulerClosed("the server is shutting down")
            if reserved:
                self._reserved -= 1
            else:
                self._check_room(1)
            self._waiting.append(seq)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="finechat-batcher", daemon=True)
                self._thread.start()
            self._cond.notify()
        return Stream(seq, on_close=self._wake)

    def reserve(self, places: int) -> Reservation:
        """Hold ``places`` in the queue for one request at once, all or nothing (a request of several prompts,
        or scoring work that runs beside the batch): raises :class:`QueueFull` when they do not all fit."""
        with self._cond:
            if self._closed:
                raise SchedulerClosed("the server is shutting down")
            self._check_room(places)
            self._reserved += places
        return Reservation(self, places)

    def _release(self, places: int) -> None:
        with self._cond:
            self._reserved -= places

    def _check_room(self, places: int) -> None:
        """Called under ``self._cond``: QueueFull when ``places`` more do not fit (running + waiting + held)."""
        if self.batched:
            running = len(self._active) + (self._solo is not None) + self._joining
            capacity = self.max_batch_size + self.max_queue
        else:
            together = self._serial_together()
            running, capacity = min(self._serial_running, together), together + self.max_queue
        waiting = len(self._waiting) + max(self._serial_running - running, 0) + self._reserved
        if running + waiting + places > capacity:
            asked = f"; this request needs {places} places" if places > 1 else ""
            raise QueueFull(f"{running} requests are running and {waiting} waiting (this server runs "
                            f"{self.max_batch_size if self.batched else self._serial_together()} together and "
                            f"queues {self.max_queue})"
                            f"{asked}; try again shortly", retry_after=self._retry_after())

    def close(self) -> None:
        """Stop the scheduler thread; waiting and running requests end with :class:`SchedulerClosed`."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # -- serial fallback -------------------------------------------------------------------------------
    def _serial_together(self) -> int:
        """How many requests the serial path runs at once: an engine that batches by itself (vLLM) takes
        ``max_batch_size``, others one."""
        return self.max_batch_size if getattr(self.chat, "concurrent", False) else 1

    def _submit_serial(self, seq: _Sequence, reserved: bool = False) -> Stream:
        with self._cond:
            if self._closed:
                raise SchedulerClosed("the server is shutting down")
            if reserved:
                self._reserved -= 1
            else:
                self._check_room(1)
            self._serial_running += 1
        released = threading.Event()

        def release() -> None:
            if not released.is_set():
                released.set()
                with self._cond:
                    self._serial_running -= 1

        def work() -> None:
            # a client leaving stops the engine inside its prefill too, not only between tokens
            ids = self.chat.generate_ids(seq.prompt_ids, dataclasses.replace(seq.settings, max_new_tokens=seq.max_new),
                                         cancelled=seq.cancelled.is_set)
            try:
                for step in ids:
                    if seq.cancelled.is_set():
                        break
                    seq.out.put(step)
            except BaseException as e:  # noqa: BLE001  handed to the consumer
                seq.out.put(e)
            finally:
                ids.close()
                seq.out.put(_END)
                release()

        threading.Thread(target=work, name="finechat-serial", daemon=True).start()
        return Stream(seq)

    # -- the scheduler loop ----------------------------------------------------------------------------
    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _retry_after(self) -> int:
        return max(1, min(30, 1 + len(self._waiting) // max(1, self.max_batch_size)))

    def _loop(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._closed and not self._waiting and not self._active and self._solo is None:
                        self._cond.wait()
                    if self._closed:
                        break
                    room = self.max_batch_size - len(self._active) - (self._solo is not None)
                    joining = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
                    self._joining = len(joining)
                    alone = len(joining) == 1 and not self._waiting and not self._active and self._solo is None
                try:
                    if self._solo is not None and (joining or self._solo[0].cancelled.is_set()):
                        self._end_solo(resume=bool(joining))  # company arrived: continue in the batch
                    if alone and not joining[0].cancelled.is_set() and self._start_solo(joining[0]):
                        joining = []
                    for seq in joining:
                        if seq.cancelled.is_set():
                            seq.out.put(_END)
                    self._admit_all([seq for seq in joining if not seq.cancelled.is_set()])
                    self._joining = 0
                    self._drop_finished()
                    if self._solo is not None:
                        self._solo_step()
                    elif self._active:
                        self._decode_step()
                        self._drop_finished()
                except BaseException as e:  # noqa: BLE001  a failed step fails its requests, not the server
                    self._joining = 0
                    failed = self._active + [s for s in joining if s not in self._active]
                    if self._solo is not None:
                        failed.append(self._solo[0])
                        self._end_solo(resume=False)
                    for seq in failed:
                        seq.out.put(e)
                        seq.out.put(_END)
                    self._active = []
                    self._cache = None
        with self._cond:
            left = self._active + list(self._waiting)
            self._active, self._waiting = [], collections.deque()
        for seq in left:
            seq.out.put(SchedulerClosed("the server is shutting down"))
            seq.out.put(_END)

    # -- a request alone runs on the engine's fast decoder ----------------------------------------------
    def _start_solo(self, seq: _Sequence) -> bool:
        """Run ``seq`` on ``ChatModel``'s fast batch-1 decoder (as in-process chat does), if there is one.

        Alone, a request gets exactly the speed of in-process ``chat``; when a second request arrives, the
        first moves into the batch (:meth:`_end_solo`).
        """
        fast = fast_decoder_for(self.chat)
        lock = self.chat.lock  # the engine's: its own generate_ids never decodes on the model at the same time
        if fast is None or not lock.acquire(blocking=False):
            return False
        try:
            tokens = generate_tokens(fast, seq.prompt_ids, seq.settings, self._stop_ids(),
                                     cancelled=seq.cancelled.is_set)  # a client leaving stops a long prefill
        except BaseException:
            lock.release()
            raise
        self._solo = (seq, tokens)
        return True

    def _solo_step(self) -> None:
        seq, tokens = self._solo
        token = next(tokens, None)
        self.steps += 1
        if token is None or self._emit(seq, token):
            self._end_solo(resume=False)

    def _end_solo(self, resume: bool) -> None:
        """Stop the fast decoder; with ``resume``, the sequence goes on in the batch where it left off."""
        seq, tokens = self._solo
        self._solo = None
        try:
            tokens.close()
        finally:
            self.chat.lock.release()
        if resume and seq.generated and not seq.cancelled.is_set():
            self._resume(seq)
        else:
            seq.out.put(_END)

    def _admit_all(self, seqs: list[_Sequence]) -> None:
        """Admit new requests, prefilling those that arrived together in shared forward passes.

        A prompt alone is a thin matrix product; several side by side make a wider one that the CPU runs
        at a better rate (16 prompts of ~42 tokens on the default model: 1.0 s together, 16 x 0.13 s one by
        one). Groups hold at most :data:`PREFILL_TOKENS` padded tokens.
        """
        group: list[_Sequence] = []
        for seq in seqs:
            width = max([len(s.prompt_ids) for s in group] + [len(seq.prompt_ids)])
            if group and width * (len(group) + 1) > PREFILL_TOKENS:
                self._admit_group(group)
                group = []
            group.append(seq)
        if group:
            self._admit_group(group)

    def _admit_group(self, seqs: list[_Sequence]) -> None:
        """Prefill new requests at once (left-padded), emit their first tokens and join them to the batch."""
        import torch

        device = _device(self.chat.model)
        lengths = [len(seq.prompt_ids) for seq in seqs]
        width = max(lengths)
        ids = torch.tensor([[0] * (width - n) + seq.prompt_ids for seq, n in zip(seqs, lengths)], device=device)
        mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths], device=device)  # [group, width]
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # each prompt counts from 0 at its first real token
        logits, cache = self._prefill(ids, mask, positions, seqs)
        if logits is None:  # every client left during the prefill
            for seq in seqs:
                seq.out.put(_END)
            return
        for seq in seqs:
            self._seed(seq, device)
        tokens = self._sample(logits, seqs)  # [group]
        keep = [row for row, (seq, token) in enumerate(zip(seqs, tokens.tolist())) if not self._emit(seq, int(token))]
        if not keep:
            return  # every one finished at its first token: none joins the batch
        index = torch.tensor(keep, device=device)
        mask = mask.index_select(0, index)
        for layer in cache.layers:
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
        pos = torch.tensor([lengths[row] for row in keep], device=device)
        self._join([seqs[row] for row in keep], cache, mask, pos, tokens.index_select(0, index))

    def _resume(self, seq: _Sequence) -> None:
        """Move a sequence that ran alone on the fast decoder into the batch where it left off: its prompt and
        all but its last token are prefilled, and the last token is the next input."""
        import torch

        device = _device(self.chat.model)
        ids = torch.tensor([seq.prompt_ids + seq.generated[:-1]], device=device)  # [1, history]
        mask = torch.ones_like(ids)
        logits, cache = self._prefill(ids, mask, None, [seq])
        if logits is None:
            seq.out.put(_END)
            return
        self._seed(seq, device)
        self._join([seq], cache, mask, torch.tensor([ids.shape[1]], device=device),
                   torch.tensor([seq.generated[-1]], device=device))

    def _prefill(self, ids: Any, mask: Any, positions: Any = None,
                 seqs: list[_Sequence] = ()) -> tuple[Any, Any]:
        """Forward passes over prompts [rows, length] into a fresh cache -> (last-position logits, cache), in
        chunks of ``PREFILL_CHUNK`` positions; (None, None) when every one of ``seqs`` was cancelled between
        chunks (a client that leaves during a long prompt frees the engine within one chunk)."""
        from transformers import DynamicCache

        cache = DynamicCache()
        width = ids.shape[1]
        out = None
        for start in range(0, width, PREFILL_CHUNK):
            if seqs and all(seq.cancelled.is_set() for seq in seqs):
                return None, None
            end = min(width, start + PREFILL_CHUNK)
            out = self.chat.model(input_ids=ids[:, start:end], attention_mask=mask[:, :end],
                                  position_ids=None if positions is None else positions[:, start:end],
                                  use_cache=True, logits_to_keep=1,
                                  **{self._cache_kwarg(): cache})  # the cache is filled in place
        return out.logits[:, -1, :], cache

    @staticmethod
    def _seed(seq: _Sequence, device: Any) -> None:
        import torch

        if seq.settings.seed is not None and seq.generator is None:
            seq.generator = torch.Generator(device=device).manual_seed(seq.settings.seed)

    def _join(self, seqs: list[_Sequence], cache: Any, mask: Any, positions: Any, last: Any) -> None:
        """Add prefilled rows (their cache, mask, next positions and last tokens) to the running batch."""
        import torch

        if self._cache is None or not self._active:
            self._cache, self._mask, self._positions, self._last = cache, mask, positions, last
        else:
            self._cache, self._mask = _merge(self._cache, self._mask, cache, mask)
            self._positions = torch.cat([self._positions, positions])
            self._last = torch.cat([self._last, last])
        self._active.extend(seqs)

    def _decode_step(self) -> None:
        import torch

        batch = len(self._active)
        ones = torch.ones(batch, 1, dtype=self._mask.dtype, device=self._mask.device)
        self._mask = torch.cat([self._mask, ones], dim=1)  # [batch, length + 1]
        out = self.chat.model(
            input_ids=self._last[:, None], attention_mask=self._mask, position_ids=self._positions[:, None],
            use_cache=True, **{self._cache_kwarg(): self._cache},
        )  # the cache grows in place by one column
        tokens = self._sample(out.logits[:, -1, :], self._active)  # [batch]
        self._last = tokens
        self._positions = self._positions + 1
        self.steps += 1
        for seq, token in zip(self._active, tokens.tolist()):
            self._emit(seq, int(token))

    def _emit(self, seq: _Sequence, token: int) -> bool:
        """Hand a token to its consumer; True when the sequence has ended."""
        seq.generated.append(token)
        self.tokens += 1
        seq.out.put([token])
        ended = token in self._stop_ids() or len(seq.generated) >= seq.max_new
        if ended:
            seq.out.put(_END)
            seq.cancelled.set()  # marks it for removal from the batch
        return ended

    def _cache_kwarg(self) -> str:
        """transformers 5.x renamed ``past_key_values`` to ``cache``; use whichever the model takes."""
        name = getattr(self, "_cache_name", None)
        if name is None:
            import inspect

            model = self.chat.model
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            name = self._cache_name = "cache" if "cache" in inspect.signature(base.forward).parameters \
                else "past_key_values"
        return name

    def _stop_ids(self) -> set[int]:
        ids = getattr(self, "_stop_id_set", None)
        if ids is None:
            ids = self._stop_id_set = set(self.chat.stop_token_ids())
        return ids

    def _drop_finished(self) -> None:
        keep = [i for i, s in enumerate(self._active) if not s.cancelled.is_set()]
        if len(keep) == len(self._active):
            return
        for s in self._active:
            if s.cancelled.is_set():
                s.out.put(_END)  # harmless if already ended; wakes a consumer that is still reading
        self._active = [self._active[i] for i in keep]
        if not keep:
            self._cache = self._mask = self._positions = self._last = None
            return
        import torch

        index = torch.tensor(keep, device=self._mask.device)
        self._mask = self._mask.index_select(0, index)
        self._positions = self._positions.index_select(0, index)
        self._last = self._last.index_select(0, index)
        # Columns that are padding in every remaining row can go: the cache shrinks back after a long answer.
        real = self._mask.any(dim=0).nonzero()
        start = int(real[0]) if len(real) else 0
        self._mask = self._mask[:, start:]
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]

    def _sample(self, logits: Any, seqs: list[_Sequence]) -> Any:
        """Next token per row of ``logits`` [batch, vocab], with each sequence's own settings (the shared
        sampler: ``generate``'s processors in its order; a request without a seed draws from the global RNG)."""
        import torch

        logits = logits.float()
        tokens = []
        for row, seq in enumerate(seqs):
            seen = torch.tensor([seq.prompt_ids + seq.generated], device=logits.device)  # [1, prompt + answer]
            tokens.append(next_token(logits[row:row + 1], seq.settings, seen, seen[:, len(seq.prompt_ids):],
                                     seq.generator))
        return torch.cat(tokens)[:, 0]  # [batch]


def _merge(cache: Any, mask: Any, new_cache: Any, new_mask: Any) -> tuple[Any, Any]:
    """Stack new rows' cache under the batch cache, left-padding the shorter one to the same length."""
    import torch
    import torch.nn.functional as F

    length, new_length = mask.shape[1], new_mask.shape[1]
    width = max(length, new_length)
    mask = torch.cat([F.pad(mask, (width - length, 0)), F.pad(new_mask, (width - new_length, 0))])
    for layer, new_layer in zip(cache.layers, new_cache.layers):
        # keys / values: [batch, kv_heads, length, head_dim]; pad the length dimension on the left.
        layer.keys = torch.cat([F.pad(layer.keys, (0, 0, width - length, 0)),
                                F.pad(new_layer.keys, (0, 0, width - new_length, 0))])
        layer.values = torch.cat([F.pad(layer.values, (0, 0, width - length, 0)),
                                  F.pad(new_layer.values, (0, 0, width - new_length, 0))])
    return cache, mask


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def _can_batch(model: Any) -> bool:
    """Whether ``model`` can decode several sequences in one padded ``DynamicCache``."""
    try:
        import torch
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - the engine needs both anyway
        return False
    if not isinstance(model, torch.nn.Module):
        return False
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return False  # P-Tuning v2 / prefix tuning bring their own past key values
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(base, PreTrainedModel) or getattr(base.config, "model_type", None) == "chatglm":
        return False
    text = base.config.get_text_config(decoder=True) if hasattr(base.config, "get_text_config") else base.config
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        return False
    layer_types = getattr(text, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        return False
    return getattr(base, "_supports_cache_class", True) is not False

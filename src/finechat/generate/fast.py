"""The fast path: decides which chats run on a model's fast batch-1 decoder, and drives its decoding loop.

The decoders themselves live beside their architectures (``finechat.models.fast_decoder`` for
Llama/Qwen2, ``finechat.models.chatglm.fast_chatglm`` for ChatGLM-6B; ``FAST_DECODERS`` lists them); here
is what turns one into an answer: prefill the prompt, then one token at a time through the shared sampler
(``finechat.generate.sampling``, ``generate``'s processors in its order) until a stop token or the budget.
Models without a decoder, or with a prompt-learning adapter, are left to ``generate``
(:func:`fast_decoder_for` returns None). Measurements: docs/results/decode.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

from finechat.generate.contract import ChatEngine
from finechat.generate.sampling import make_generator, next_token
from finechat.generate.settings import GenerationSettings
from finechat.models.decoder_table import fast_decoder, is_supported
from finechat.models.fast_decoder import StaticCacheDecoder


def generate_tokens(decoder: StaticCacheDecoder, input_ids: list[int], settings: GenerationSettings,
                    stop_token_ids: Iterable[int] = (), generator: torch.Generator | None = None,
                    cancelled: Callable[[], bool] | None = None) -> Iterator[int]:
    """Yield new token ids one at a time (a stop token is yielded, then generation ends).

    Closing the iterator stops decoding at once. ``generator`` drives sampling; by default one seeded with
    ``settings.seed`` (fresh entropy when None), so the global RNG is never touched. ``cancelled()``, when
    given, is asked between chunks of the prompt's prefill (between layers for ChatGLM-6B, whose prompt is
    bidirectional) and before each decoding step: a long prompt stops there, nothing more is yielded.
    """
    if not input_ids:
        raise ValueError("the prompt is empty")
    if generator is None:
        generator = make_generator(decoder.device, settings.seed)
    prompt_length = len(input_ids)
    max_new_tokens = settings.max_new_tokens_for(prompt_length)
    total = prompt_length + max_new_tokens
    decoder.setup_cache(1, total)
    tokens = torch.tensor([input_ids], dtype=torch.long, device=decoder.device)  # [1, prompt]
    seen = torch.empty(1, total, dtype=torch.long, device=decoder.device)  # prompt + answer, for the penalties
    seen[:, :prompt_length] = tokens
    stops = set(stop_token_ids)
    logits = decoder.prefill(tokens) if cancelled is None else decoder.prefill_until(tokens, cancelled)
    if logits is None:
        return
    for step in range(max_new_tokens):
        length = prompt_length + step
        token = next_token(logits, settings, seen[:, :length], seen[:, prompt_length:length], generator)  # [1, 1]
        seen[:, length] = token[:, 0]
        token_id = int(token)
        yield token_id
        if token_id in stops or step == max_new_tokens - 1 or (cancelled is not None and cancelled()):
            return
        logits = decoder.decode_one_token(token, length)


def fast_decoder_for(chat_model: ChatEngine) -> StaticCacheDecoder | None:
    """The fast decoder of a ``ChatModel`` (made once per model), or None when its model needs ``generate``
    (or the engine has no PyTorch model: no ``use_fast_decoder`` field).

    ``chat_model.use_fast_decoder = False`` always uses ``generate``; ``chat_model.compile_decoder = True``
    (``finechat.load(..., compile=True)``, ``--compile``) compiles the decoder's one-token step.
    """
    if not getattr(chat_model, "use_fast_decoder", False):  # an engine without a PyTorch model has none
        return None
    model = chat_model.model
    if chat_model.fast_decoder_cache is None or chat_model.fast_decoder_cache[0] is not model:
        decoder = fast_decoder(model, compile=chat_model.compile_decoder) if is_supported(model) else None
        chat_model.fast_decoder_cache = (model, decoder)
    return chat_model.fast_decoder_cache[1]

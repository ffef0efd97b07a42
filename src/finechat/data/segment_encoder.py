"""Encode many texts with a Hugging Face fast tokenizer, encoding each repeated piece of text only once.

Why our own: the Rust tokenizer (``tokenizers``) first cuts a text at its added tokens (``<|im_start|>``,
``<|im_end|>`` ...) and then encodes each piece between them on its own, so the ids of a text are the ids of
its pieces with the added tokens' ids between them. Training data rendered through a chat template repeats
most of those pieces in every record: the default system prompt, ``"\\n"``, ``"assistant\\n"``. The library has
a word cache inside its BPE model, but it still runs the pre-tokenizer, the cache look-ups and builds every
piece's encoding again for every record (about a third of the encoding time of an ADGEN record with
SmolLM2's template). Here the pieces that repeat within a batch are encoded once and kept (up to a bound);
the rest are encoded in one batched call as before.

Only tokenizers whose added tokens are matched as plain text qualify (no ``lstrip`` / ``rstrip`` /
``single_word`` / ``normalized`` added tokens: those change the text around the token). As a guard, the
first batch is also encoded directly and compared; any difference turns the piece cache off for good.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

_MAX_CACHED = 20_000  # repeated pieces kept; later ones are encoded each time
_CHECKED_TEXTS = 256  # texts of the first batch also encoded directly, as a guard


class SegmentEncoder:
    """``encode(texts) -> list[list[int]]``, equal to ``backend.encode_batch_fast(texts)``'s ids."""

    def __init__(self, backend: Any):
        self.backend = backend
        self.cache: dict[str, list[int]] = {}
        self.enabled = True
        self.checked = False
        added = backend.get_added_tokens_decoder()
        if any(t.lstrip or t.rstrip or t.single_word or t.normalized for t in added.values()) or not added:
            self.enabled = False
            self.split = None
            return
        ids = {t.content: i for i, t in added.items()}
        self.ids = ids
        self.split = re.compile("(" + "|".join(re.escape(c) for c in sorted(ids, key=len, reverse=True)) + ")")

    def _direct(self, texts: list[str]) -> list[list[int]]:
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def encode(self, texts: list[str]) -> list[list[int]]:
        if not self.enabled or not texts:
            return self._direct(texts)
        ids, cache = self.ids, self.cache
        parts = [self.split.split(t) for t in texts]  # text, added token, text, ... (texts may be empty)
        counts = Counter(p for ps in parts for p in ps[0::2] if p and p not in cache)
        missing = list(counts)
        encoded = dict(zip(missing, self._direct(missing)))
        if len(cache) < _MAX_CACHED:
            cache.update((p, encoded[p]) for p, n in counts.items() if n > 1)
        out: list[list[int]] = []
        for ps in parts:
            row: list[int] = []
            for i, p in enumerate(ps):
                if i % 2:
                    row.append(ids[p])
                elif p:
                    row += cache[p] if p in cache else encoded[p]
            out.append(row)
        if not self.checked:
            self.checked = True
            if out[:_CHECKED_TEXTS] != self._direct(texts[:_CHECKED_TEXTS]):
                self.enabled, self.cache = False, {}
                return self._direct(texts)
        return out

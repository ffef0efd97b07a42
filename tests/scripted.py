"""The scripted model double of the tests: a real ChatModel whose "generation" is a script.

Prompt building, stop strings, decoding, streaming, the tool runtime and the server are the real code; only
``generate_ids`` is replaced, which is what lets a test steer the control flow (a tool call, a slow answer, a
dropped client) without a trained model.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from finechat.generate.engine import ChatModel


class ScriptedChat(ChatModel):
    """A ChatModel that "generates" ``script``: a fixed text, or a function of the prompt text returning one.

    ``eos``: end the script with the tokenizer's EOS token (a natural end of the answer); ``delay``: seconds
    before each token. ``prompts`` records the prompts it was given, as token ids (``prompts_as="ids"``) or as
    text (``"text"``); ``running`` counts generations in progress (a dropped client must bring it back to 0)
    and ``emitted`` the tokens yielded so far.
    """

    def __init__(self, tokenizer, script: str | Callable[[str], str], template: str = "tokenizer",
                 delay: float = 0.0, eos: bool = True, prompts_as: str = "ids"):
        super().__init__(model=None, tokenizer=tokenizer, template=template)
        self.eos = eos
        self.text = script
        self.script = self._ids(script) if isinstance(script, str) else None  # the fixed script's token ids
        self.delay = delay
        self.prompts_as = prompts_as
        self.prompts: list = []
        self.running = 0
        self.emitted = 0

    def _ids(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids + [self.tokenizer.eos_token_id] if self.eos else ids

    def generate_ids(self, input_ids, settings, cancelled=None):
        self.running += 1
        prompt = self.tokenizer.decode(input_ids)
        self.prompts.append(prompt if self.prompts_as == "text" else list(input_ids))
        ids = self.script if self.script is not None else self._ids(self.text(prompt))
        ids = ids[: settings.max_new_tokens]
        step = 32 if len(ids) >= 200 and not self.delay else 1  # long scripts in bigger steps: decoding is O(length)
        try:
            for i in range(0, len(ids), step):
                if cancelled is not None and cancelled():
                    return
                if self.delay:
                    time.sleep(self.delay)
                self.emitted += len(ids[i:i + step])
                yield ids[i:i + step]
        finally:
            self.running -= 1

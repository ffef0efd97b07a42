"""A scripted MOSS model double for the tool tests: "generation" is a function of the prompt text."""

from finechat.generate.engine import ChatModel


class ScriptedModel(ChatModel):
    """A ChatModel whose "generation" is a script: a function of the prompt text returning the continuation.

    Everything else (prompt building, stop strings, decoding, the tool runtime) is the real code.
    """

    def __init__(self, tokenizer, script, template="moss"):
        super().__init__(model=None, tokenizer=tokenizer, template=template)
        self.script = script
        self.prompts = []

    def generate_ids(self, input_ids, settings):
        prompt = self.tokenizer.decode(input_ids)
        self.prompts.append(prompt)
        ids = self.tokenizer(self.script(prompt), add_special_tokens=False)["input_ids"]
        ids = ids[: settings.max_new_tokens]
        step = 1 if len(ids) < 200 else 32  # long scripts in bigger steps: decoding each step is O(length)
        for i in range(0, len(ids), step):
            yield ids[i:i + step]


def last_results(prompt):
    """The text of the last <|Results|> block in a MOSS prompt (what the runtime injected)."""
    block = prompt.rsplit("<|Results|>:\n", 1)[1].split("\n<eor>", 1)[0]
    return block.split(" =>\n", 1)[1]


def moss_script(command):
    def script(prompt):
        if prompt.endswith("<|MOSS|>:"):
            return f" The tool says: {last_results(prompt)}<eom>"
        return f"<|Inner Thoughts|>: I need a tool for this.<eot>\n<|Commands|>: {command}<eoc>"
    return script

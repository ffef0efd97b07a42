"""A scripted MOSS model double for the tool tests: "generation" is a function of the prompt text."""

from scripted import ScriptedChat


def ScriptedModel(tokenizer, script, template="moss"):  # noqa: N802  (the tool tests' name for it)
    """The scripted double for MOSS tool runs: ``script`` answers each prompt; prompts are kept as text."""
    return ScriptedChat(tokenizer, script, template=template, eos=False, prompts_as="text")


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

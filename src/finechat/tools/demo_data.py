"""Tool-use conversations for the tools demo, deterministic by seed, with results from the real tools.

Each :class:`ToolExample` is a user question -> one tool call -> the tool's result -> a final answer that holds the
exact result. Three kinds: ``arithmetic`` (``Calculate(expression)``: sums, products, powers, roots, percentages,
word problems), ``equation`` (``Solve(equation)``: linear, both-sided, quadratic, 2x2 systems) and ``lookup``
(``Search(query)`` over :data:`DEMO_DOCS`, a few invented notes about an island town shipped with finechat, so
the answer can only come from the tool); plus a few ``chat`` turns that need no tool.

The result of every call is what :class:`~finechat.tools.toolbox.ToolRegistry` really returns for it (the
generator runs each call), so the trained answers cannot drift from the tools. Written in the two layouts
finechat trains: OpenAI ``{"messages": [... tool_calls ...], "tools": [...]}`` (:func:`openai_record`, the
layout the default model's ``native`` protocol is trained on: the tools go into the system prompt through
:func:`finechat.data.tool_prompt.tool_prompt`, as chat and serve show them) and MOSS-003 plugin records
(:func:`moss_record`, for ``--template moss`` models).

Look-up facts are split once, by position, into training and held-out facts (:data:`HELD_OUT_FACTS`), so a
held-out look-up asks about a fact the training data never answered. Written for this project; no copied data.
"""

from __future__ import annotations

import dataclasses
import json
import random
from importlib import resources
from pathlib import Path

from finechat.errors import ConfigError
from finechat.tools.agent import moss_system_prompt
from finechat.tools.toolbox import ToolRegistry, build_registry

DEMO_DOCS = Path(str(resources.files("finechat.tools").joinpath("resources/demo_docs")))
DEMO_TOOLS = "calculator,solver,search"  # build_registry names; the API names follow in the same order
API_NAMES = ("Calculate", "Solve", "Search")
KINDS = ("arithmetic", "equation", "lookup", "chat")
TRAIN_MIX = {"arithmetic": 0.38, "equation": 0.3, "lookup": 0.27, "chat": 0.05}
HELD_OUT_MIX = {"arithmetic": 1 / 3, "equation": 1 / 3, "lookup": 1 / 3}

# (questions, search query, final answer, the exact value the answer must hold); the notes are in DEMO_DOCS.
FACTS: list[tuple[tuple[str, ...], str, str, str]] = [
    (("When was Larkhaven founded?", "In what year was Larkhaven founded?"),
     "Larkhaven founded", "Larkhaven was founded in 1743.", "1743"),
    (("How many people live in Larkhaven?", "What is the population of Larkhaven?"),
     "Larkhaven population", "Larkhaven has a population of 4,312.", "4,312"),
    (("Who is the mayor of Larkhaven?", "Who is Larkhaven's mayor?"),
     "mayor of Larkhaven", "The mayor of Larkhaven is Edda Quill.", "Edda Quill"),
    (("How tall is the Larkhaven lighthouse?", "What is the height of the lighthouse in Larkhaven?"),
     "Larkhaven lighthouse tall", "The Larkhaven lighthouse is 38 metres tall.", "38 metres"),
    (("When is the Kite Festival?", "On what day is the Larkhaven Kite Festival held?"),
     "Kite Festival", "The Kite Festival takes place on the second Sunday of June.", "second Sunday of June"),
    (("What is the oldest building in Larkhaven?", "Which building in Larkhaven is the oldest?"),
     "oldest building Larkhaven", "The oldest building in Larkhaven is the Salt House.", "Salt House"),
    (("How high is Gull Hill?", "What is the highest point on the island and how high is it?"),
     "Gull Hill highest point", "Gull Hill is 212 metres above sea level.", "212 metres"),
    (("How big is the island of Larkhaven?", "What area does Larkhaven cover?"),
     "Larkhaven area square kilometres", "Larkhaven covers 18.6 square kilometres.", "18.6 square kilometres"),
    (("What is the twin town of Larkhaven?", "Which town is Larkhaven twinned with?"),
     "twin town Larkhaven", "The twin town of Larkhaven is Porto Sereno in Italy.", "Porto Sereno"),
    (("When is the Larkhaven Gazette published?", "On which day does the local newspaper come out?"),
     "Larkhaven Gazette newspaper published", "The Larkhaven Gazette is published every Thursday.", "Thursday"),
    (("What time does the ferry to the mainland leave?", "When does the morning ferry leave Larkhaven?"),
     "ferry mainland leaves", "The ferry to the mainland leaves at 7:40.", "7:40"),
    (("How long is the ferry crossing to Dunmore?", "How long does the ferry take from Larkhaven to Dunmore?"),
     "ferry crossing Dunmore", "The crossing to Dunmore takes 55 minutes.", "55 minutes"),
    (("How much is a return ferry ticket?", "What does an adult return ticket for the ferry cost?"),
     "return ferry ticket costs", "A return ferry ticket costs 14.50 euros for adults.", "14.50 euros"),
    (("How often does the island bus run?", "How frequent is bus route 3 to Gull Hill?"),
     "island bus route 3", "The island bus runs every 25 minutes.", "25 minutes"),
    (("How long is the runway of the Larkhaven airstrip?", "What is the length of the airstrip runway?"),
     "airstrip runway long", "The airstrip runway is 640 metres long.", "640 metres"),
    (("How much does it cost to hire a bicycle?", "What is the price of bicycle hire at the harbour?"),
     "bicycle hire harbour costs", "Bicycle hire costs 9 euros a day.", "9 euros"),
    (("How many moorings does the harbour have for visiting boats?", "How many visiting boats can moor in the harbour?"),
     "harbour moorings visiting boats", "The harbour has 86 moorings for visiting boats.", "86"),
    (("How long is the coastal path around Larkhaven?", "What is the length of the coastal path?"),
     "coastal path long", "The coastal path is 23 kilometres long.", "23 kilometres"),
    (("When does the last bus leave the harbour?", "What time is the last bus of the day?"),
     "last bus harbour", "The last bus leaves the harbour at 22:15.", "22:15"),
    (("What is the phone number of the island taxi company?", "How do I call a taxi on the island?"),
     "taxi phone number", "Call Tern Cabs on 0471 3382.", "0471 3382"),
    (("When does the Larkhaven Library open?", "What time does the library open?"),
     "Larkhaven Library opens", "The Larkhaven Library opens at 9:30.", "9:30"),
    (("How many books does the Larkhaven Library hold?", "How many books are there in the library?"),
     "Larkhaven Library books", "The Larkhaven Library holds 48,213 books.", "48,213"),
    (("How much does entry to the Salt Museum cost?", "What is the entry price of the Salt Museum?"),
     "Salt Museum entry costs", "Entry to the Salt Museum costs 6 euros.", "6 euros"),
    (("What is the Harbour Bakery famous for?", "What is the Harbour Bakery known for?"),
     "Harbour Bakery famous", "The Harbour Bakery is famous for its seaweed bread.", "seaweed bread"),
    (("How many pupils does Larkhaven School have?", "How many pupils go to the school in Larkhaven?"),
     "Larkhaven School pupils", "Larkhaven School has 312 pupils.", "312"),
    (("Who is the doctor on the island?", "What is the name of the island doctor?"),
     "island doctor", "The island doctor is Ines Calloway.", "Ines Calloway"),
    (("How wide is the mirror of the Gull Hill telescope?", "How wide is the observatory telescope's mirror?"),
     "Gull Hill observatory telescope mirror", "The telescope's mirror is 60 centimetres wide.", "60 centimetres"),
    (("How many guest rooms does the Anchor Inn have?", "How many rooms are there at the Anchor Inn?"),
     "Anchor Inn guest rooms", "The Anchor Inn has 14 guest rooms.", "14"),
    (("When does the swimming pool open?", "What time does the sports hall pool open on weekdays?"),
     "swimming pool opens", "The swimming pool opens at 7:00 on weekdays.", "7:00"),
    (("Where is the weekly market held?", "Where is the Saturday market?"),
     "weekly market", "The weekly market is held in Harbour Square.", "Harbour Square"),
]
HELD_OUT_FACTS = frozenset(range(2, len(FACTS), 5))  # one fact in five is never trained on

CHAT = [
    ("Hello!", "Hello! I can do exact arithmetic, solve equations and look things up in the documents. "
               "What would you like to know?"),
    ("Who are you?", "I am a small assistant that uses tools: a calculator, an equation solver and a search "
                     "over local documents."),
    ("Thank you!", "You're welcome!"),
    ("What can you do?", "I can calculate, solve equations and search the documents I was given."),
    ("Good morning!", "Good morning! How can I help you today?"),
    ("Tell me a short joke.", "Why did the calculator cross the road? To add some distance."),
]
THOUGHTS = {"Calculate": "I need to calculate {arg}, so I use the calculator.",
            "Solve": "I need to solve {arg}, so I use the equation solver.",
            "Search": "I should search the documents for {arg}."}


@dataclasses.dataclass
class ToolExample:
    """One tool-use conversation (``tool`` None: a chat turn answered without a tool)."""

    kind: str
    question: str
    tools: list[str]  # API names offered to the model, in DEMO_TOOLS order
    tool: str | None
    arguments: dict
    result: str  # what the tool returned
    answer: str  # the final answer (holds ``expected``)
    expected: str  # the exact value a right answer holds ("" for chat)
    history: list = dataclasses.field(default_factory=list)  # earlier (question, answer) pairs of the chat

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def demo_registry(docs: str | Path | None = None) -> ToolRegistry:
    """Calculate, Solve and Search (over ``docs``, the shipped demo notes by default), as chat builds them."""
    return build_registry(DEMO_TOOLS, docs=str(docs or DEMO_DOCS))


# -- questions ------------------------------------------------------------------------------------------------
def _arithmetic(rng: random.Random) -> tuple[str, str, list[str]]:
    """(question, expression, answer templates with {e} / {r})."""
    plain = ["{e} = {r}.", "The answer is {r}.", "{e} = {r}, so the answer is {r}."]
    n = rng.randint
    kind = rng.choice(["add", "sub", "mul", "div", "pow", "sqrt", "mixed", "percent", "decimal", "word"])
    if kind == "add":
        a, b = n(100, 9999), n(100, 9999)
        qs = [f"What is {a} + {b}?", f"What is {a} plus {b}?", f"Add {a} and {b}.", f"What's the sum of {a} and {b}?"]
        return rng.choice(qs), f"{a} + {b}", plain
    if kind == "sub":
        a, b = n(100, 9999), n(100, 9999)
        qs = [f"What is {a} - {b}?", f"What is {a} minus {b}?", f"Subtract {b} from {a}.", f"Calculate {a} - {b}."]
        return rng.choice(qs), f"{a} - {b}", plain
    if kind == "mul":
        a, b = n(12, 999), n(12, 999)
        qs = [f"What is {a} * {b}?", f"What is {a} times {b}?", f"Multiply {a} by {b}.", f"How much is {a} x {b}?"]
        return rng.choice(qs), f"{a} * {b}", plain
    if kind == "div":
        b, r = n(3, 99), n(2, 999)
        qs = [f"What is {b * r} / {b}?", f"Divide {b * r} by {b}.", f"What is {b * r} divided by {b}?"]
        return rng.choice(qs), f"{b * r} / {b}", plain
    if kind == "pow":
        a, p = n(2, 40), n(2, 5)
        qs = [f"What is {a} to the power of {p}?", f"What is {a}^{p}?", f"Calculate {a} raised to the power {p}."]
        return rng.choice(qs), f"{a}**{p}", plain
    if kind == "sqrt":
        s = n(11, 199) ** 2
        qs = [f"What is the square root of {s}?", f"Calculate the square root of {s}.", f"What is sqrt({s})?"]
        return rng.choice(qs), f"sqrt({s})", plain
    if kind == "mixed":
        a, b, c = n(10, 999), n(10, 999), n(2, 99)
        e = rng.choice([f"({a} + {b}) * {c}", f"{a} * {c} - {b}", f"({a} - {b}) * {c}", f"{a} + {b} * {c}"])
        qs = [f"What is {e}?", f"Calculate {e}.", f"Compute {e}."]
        return rng.choice(qs), e, plain
    if kind == "percent":
        p, m = n(1, 99), n(1, 50) * 20
        qs = [f"What is {p}% of {m}?", f"How much is {p} percent of {m}?", f"Calculate {p}% of {m}."]
        return rng.choice(qs), f"{p} / 100 * {m}", [f"{p}% of {m} is {{r}}.", "The answer is {r}."]
    if kind == "decimal":
        a, b = n(100, 99999) / 100, n(100, 99999) / 100
        op = rng.choice(["+", "-", "*"])
        word = {"+": "plus", "-": "minus", "*": "times"}[op]
        qs = [f"What is {a:.2f} {op} {b:.2f}?", f"What is {a:.2f} {word} {b:.2f}?", f"Calculate {a:.2f} {op} {b:.2f}."]
        return rng.choice(qs), f"{a:.2f} {op} {b:.2f}", plain
    a, b = n(12, 480), n(3, 99)
    story = rng.choice([
        (f"A crate holds {a} bottles. How many bottles are in {b} crates?", f"{a} * {b}",
         f"{b} crates hold {{r}} bottles."),
        (f"Tickets cost {a} euros each. How much do {b} tickets cost?", f"{a} * {b}",
         f"{b} tickets cost {{r}} euros."),
        (f"I had {a * b} euros and spent {a}. How much do I have left?", f"{a * b} - {a}",
         "You have {r} euros left."),
        (f"{a * b} sweets are shared equally among {b} children. How many sweets does each child get?",
         f"{a * b} / {b}", "Each child gets {r} sweets."),
        (f"A train travels at {a} km/h for {b} hours. How far does it go?", f"{a} * {b}",
         "It travels {r} km."),
    ])
    return story[0], story[1], [story[2], "{e} = {r}, so the answer is {r}."]


def _signed(coefficient: int, variable: str = "", first: bool = False) -> str:
    """A term of an equation: ``3x``, `` - x``, `` + 7``."""
    if coefficient == 0:
        return "0" if first and not variable else ""
    magnitude = abs(coefficient)
    body = (variable if magnitude == 1 else f"{magnitude}{variable}") if variable else str(magnitude)
    if first:
        return ("-" if coefficient < 0 else "") + body
    return f" - {body}" if coefficient < 0 else f" + {body}"


def _equation(rng: random.Random) -> tuple[str, str, list[str]]:
    """(question, equation, answer templates with {e} / {r})."""
    n = rng.randint
    answers = ["The solution is {r}.", "{r}.", "Solving {e} gives {r}."]
    kind = rng.choice(["linear", "linear", "both", "quadratic", "system"])
    if kind == "linear":
        x, a, b = n(-20, 20), rng.choice([k for k in range(-12, 13) if k not in (0, 1)]), n(-60, 60)
        e = f"{_signed(a, 'x', True)}{_signed(b)} = {a * x + b}"
        qs = [f"Solve {e}.", f"Solve for x: {e}", f"Find x if {e}.", f"What value of x satisfies {e}?"]
    elif kind == "both":
        x, a, c, b = n(-15, 15), n(3, 12), n(1, 2), n(-40, 40)
        d = (a - c) * x + b
        e = f"{_signed(a, 'x', True)}{_signed(b)} = {_signed(c, 'x', True)}{_signed(d)}"
        qs = [f"Solve {e}.", f"Solve for x: {e}", f"Find x such that {e}."]
    elif kind == "quadratic":
        r1, r2 = sorted(rng.sample(range(-12, 13), 2))
        e = f"x^2{_signed(-(r1 + r2), 'x')}{_signed(r1 * r2)} = 0"
        qs = [f"Find the roots of {e}.", f"Solve {e}.", f"What are the solutions of {e}?"]
    else:
        x, y, a = n(-20, 20), n(-20, 20), n(1, 5)
        first, second = f"{_signed(a, 'x', True)} + y = {a * x + y}", f"x - y = {x - y}"
        e = f"{first}, {second}"
        qs = [f"Solve the system {first}, {second}.", f"Find x and y if {first} and {second}.",
              f"Solve {first} and {second} for x and y."]
    return rng.choice(qs), e, answers


# -- examples -------------------------------------------------------------------------------------------------
def _offered(rng: random.Random, needed: str | None, question: str, shuffle: bool) -> list[str]:
    """The tools offered with one example: the one it needs plus, most often, the others (so a model trained on
    them works with ``--tools calculator`` as with all three). In training the list comes in varied orders: a
    model shown one order picks a tool by its place in the list (measured: arithmetic went to Search, listed
    last) instead of by the question."""
    chosen = [name for name in API_NAMES if name == needed or rng.random() < 0.75] or [rng.choice(API_NAMES)]
    if shuffle:  # its own generator: the held-out questions stay the same whatever the training order
        random.Random(question).shuffle(chosen)
    return chosen


def _run(registry: ToolRegistry, name: str, arguments: dict) -> str:
    result = registry.call(name, dict(arguments))
    if not result.ok:
        raise ConfigError(f"the demo data asked {name}({arguments}) and the tool said: {result.content}")
    return result.content


class _Lookups:
    """Look-up questions drawn as from a shuffled deck of (fact, phrasing): each once before any repeats."""

    def __init__(self, rng: random.Random, facts: list[int]):
        self.rng, self.deck = rng, []
        self.pairs = [(i, q) for i in facts for q in FACTS[i][0]]

    def draw(self) -> tuple[int, str]:
        if not self.deck:
            self.deck = list(self.pairs)
            self.rng.shuffle(self.deck)
        return self.deck.pop()


def _example(kind: str, rng: random.Random, registry: ToolRegistry, lookups: _Lookups, seen: set[str],
             shuffle: bool) -> ToolExample:
    if kind == "chat":
        question, answer = rng.choice(CHAT)
        return ToolExample("chat", question, _offered(rng, None, question, shuffle), None, {}, "", answer, "")
    if kind == "lookup":
        fact, question = lookups.draw()
        _, query, answer, value = FACTS[fact]
        result = _run(registry, "Search", {"query": query})
        if value not in result.split("\n", 1)[0]:  # the first hit must hold it: the notes or BM25 changed
            raise ConfigError(f"Search({query!r}) no longer finds {value!r} first: {result}")
        return ToolExample("lookup", question, _offered(rng, "Search", question, shuffle), "Search", {"query": query},
                           result, answer, value)
    for _ in range(100):  # a result that is not a short exact number (100/7, a huge power) or a repeat: again
        question, expression, answers = (_arithmetic if kind == "arithmetic" else _equation)(rng)
        if question in seen:
            continue
        tool, key = ("Calculate", "expression") if kind == "arithmetic" else ("Solve", "equation")
        result = _run(registry, tool, {key: expression})
        if "/" not in result and "≈" not in result and len(result) <= 24:
            seen.add(question)
            answer = rng.choice(answers).replace("{e}", expression).replace("{r}", result)
            return ToolExample(kind, question, _offered(rng, tool, question, shuffle), tool, {key: expression}, result,
                               answer, result)
    raise ConfigError(f"no {kind} question with a short exact result in 100 tries")  # pragma: no cover


def generate_tool_examples(n: int, seed: int = 0, split: str = "train",
                           registry: ToolRegistry | None = None) -> list[ToolExample]:
    """``n`` examples; the same seed and split give the same examples.

    ``split="train"`` mixes the kinds as :data:`TRAIN_MIX` (with a few chat turns) over the training facts;
    ``"heldout"`` takes a third of each tool kind (no chat turns) and asks only about :data:`HELD_OUT_FACTS`.
    """
    if n < 0:
        raise ConfigError("n must be >= 0")
    if split not in ("train", "heldout"):
        raise ConfigError(f"split must be train or heldout, got {split!r}")
    # Our own questions need no time limit in a forked process (Solve's guard against a model's runaway call):
    # the same functions, argument checks and results, without a process per call.
    registry = ToolRegistry(dataclasses.replace(tool, isolate=False) for tool in registry or demo_registry())
    mix = TRAIN_MIX if split == "train" else HELD_OUT_MIX
    facts = [i for i in range(len(FACTS)) if (i in HELD_OUT_FACTS) == (split == "heldout")]
    rng = random.Random(f"{split}:{seed}")
    # Exact counts per kind (largest remainders), in a shuffled order: a small set still holds every kind.
    counts = {k: int(n * w) for k, w in mix.items()}
    for k in sorted(mix, key=lambda k: n * mix[k] - counts[k], reverse=True)[: n - sum(counts.values())]:
        counts[k] += 1
    kinds = [k for k, c in counts.items() for _ in range(c)]
    rng.shuffle(kinds)
    lookups, seen = _Lookups(rng, facts), set()
    examples = [_example(kind, rng, registry, lookups, seen, split == "train") for kind in kinds]
    if split == "train":  # a quarter follow an earlier exchange, as the second question of a chat does
        earlier = random.Random(f"history:{seed}")
        for example in examples:
            if len(examples) > 1 and earlier.random() < 0.25:
                other = earlier.choice([e for e in examples if e is not example])
                example.history = [(other.question, other.answer)]
    return examples


# -- layouts --------------------------------------------------------------------------------------------------
def openai_record(example: ToolExample, registry: ToolRegistry, index: int = 0) -> dict:
    """The OpenAI chat layout finechat reads (``format: openai``): ``messages`` with ``tool_calls`` + ``tools``."""
    tools = [registry.get(name).openai_schema() for name in example.tools]
    messages: list[dict] = [{"role": role, "content": text} for pair in example.history
                            for role, text in zip(("user", "assistant"), pair)]
    messages.append({"role": "user", "content": example.question})
    if example.tool is not None:
        call_id = f"call_{index}"
        messages += [
            {"role": "assistant", "content": None, "tool_calls": [{"id": call_id, "type": "function", "function": {
                "name": example.tool, "arguments": json.dumps(example.arguments, ensure_ascii=False)}}]},
            {"role": "tool", "tool_call_id": call_id, "name": example.tool, "content": example.result},
        ]
    messages.append({"role": "assistant", "content": example.answer})
    return {"messages": messages, "tools": tools}


def moss_call(example: ToolExample) -> str:
    """The call as MOSS writes it in ``<|Commands|>``: ``Calculate("12 * 34")``."""
    return f"{example.tool}({json.dumps(next(iter(example.arguments.values())), ensure_ascii=False)})"


_MOSS_NONE = {"Inner Thoughts": "<|Inner Thoughts|>: None<eot>\n", "Commands": "<|Commands|>: None<eoc>\n",
              "Tool Responses": "<|Results|>: None<eor>\n"}


def moss_record(example: ToolExample, registry: ToolRegistry, index: int = 0) -> dict:
    """A MOSS-003 plugin record (``format: moss``) whose meta instruction lists the offered tools as the tool
    runtime does (:func:`finechat.tools.agent.moss_system_prompt`)."""
    offered = ToolRegistry(registry.get(name) for name in example.tools)
    turns = [{"Human": f"<|Human|>: {question}<eoh>\n", **_MOSS_NONE, "MOSS": f"<|MOSS|>: {answer}<eom>\n"}
             for question, answer in example.history]
    turn = {"Human": f"<|Human|>: {example.question}<eoh>\n"}
    if example.tool is None:
        turn |= _MOSS_NONE
    else:
        call = moss_call(example)
        thought = THOUGHTS[example.tool].format(arg=next(iter(example.arguments.values())))
        turn |= {"Inner Thoughts": f"<|Inner Thoughts|>: {thought}<eot>\n",
                 "Commands": f"<|Commands|>: {call}<eoc>\n",
                 "Tool Responses": f"<|Results|>:\n{call} =>\n{example.result}\n<eor>\n"}
    turn["MOSS"] = f"<|MOSS|>: {example.answer}<eom>\n"
    return {"conversation_id": index + 1, "meta_instruction": moss_system_prompt(offered), "category": example.kind,
            "chat": {f"turn_{i + 1}": t for i, t in enumerate(turns + [turn])}}


LAYOUTS = {"openai": openai_record, "moss": moss_record}


def tool_records(examples: list[ToolExample], layout: str, registry: ToolRegistry) -> list[dict]:
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r}; choose from: {', '.join(LAYOUTS)}")
    return [LAYOUTS[layout](example, registry, i) for i, example in enumerate(examples)]

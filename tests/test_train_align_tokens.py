"""KTO, ORPO, SimPO and GRPO train on exactly the token ids SFT would build, with the prompt never trained.

Each stage runs one real TRL step on the tiny model; a spy on each stage record's trainer builder records the collated batch the
trainer computes its loss on and every sequence that reaches the model's forward. Both are compared with the
SFT path (:func:`finechat.data.tokenize.tokenize_conversation`), which knows nothing of preference data.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from finechat.data.conversation import Conversation, Turn
from finechat.data.templates import get_template
from finechat.data.tokenize import IGNORE_INDEX, TokenizeSettings, tokenize_conversation
from finechat.train.recipe import run_training
from finechat.train.stage_table import STAGES
from finechat.train.train_config import TrainConfig

PAIRS = [  # English, Chinese, and a system prompt with an earlier turn
    {"prompt": "What is the capital of France?", "chosen": "The capital of France is Paris.",
     "rejected": "The quick brown fox."},
    {"prompt": "中国的首都是哪里？", "chosen": "中国的首都是北京。", "rejected": "法国的首都是巴黎。"},
    {"prompt": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hello, how are you?"},
                {"role": "user", "content": "Write a short poem about the sea."}],
     "chosen": "The sea and the sky.", "rejected": "I am fine, thank you."},
    {"prompt": "你好", "chosen": "你好！很高兴认识你！", "rejected": "The lazy dog."},
]


def _conversation(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _sft_row(tokenizer, template, prompt, answer) -> tuple[tuple, tuple]:
    """(ids, trained flags) SFT builds for prompt + answer, up to its last trained token (what follows it, a
    newline after the end marker, changes no trained token's loss)."""
    messages = _conversation(prompt) + [{"role": "assistant", "content": answer}]
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    conv = Conversation([Turn(m["role"], m["content"]) for m in messages if m["role"] != "system"], system=system)
    example = tokenize_conversation(conv, tokenizer, template, TokenizeSettings(cutoff_len=4096, last_turn_only=True))
    trained = [label != IGNORE_INDEX for label in example["labels"]]
    end = max(i for i, t in enumerate(trained) if t) + 1
    return tuple(example["input_ids"][:end]), tuple(trained[:end])


def _rows(ids, keep, trained) -> set:
    """(ids, trained flags) of each row of a batch, its padding removed."""
    out = set()
    for row_ids, row_keep, row_trained in zip(ids.tolist(), keep.tolist(), trained.tolist()):
        n = sum(row_keep)
        assert row_keep[:n] == [1] * n  # right padding
        out.add((tuple(row_ids[:n]), tuple(bool(t) for t in row_trained[:n])))
    return out


def _batch_rows(stage: str, batch: dict) -> set:
    """The sequences of a collated batch with the positions the stage's loss trains."""
    if stage == "kto":
        return _rows(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    return (_rows(batch["chosen_input_ids"], batch["chosen_attention_mask"], batch["chosen_labels"] != IGNORE_INDEX)
            | _rows(batch["rejected_input_ids"], batch["rejected_attention_mask"],
                    batch["rejected_labels"] != IGNORE_INDEX))


@pytest.fixture
def spy(monkeypatch):
    """Records the batches each trainer computes its loss on and the ids every model forward receives."""
    seen: dict = {"batches": [], "forward": [], "generate": []}

    def watching(make):
        def make_and_watch(*args, **kwargs):
            trainer = make(*args, **kwargs)
            compute_loss = trainer.compute_loss

            def watched_loss(model, inputs, *a, **kw):
                seen["batches"].append(dict(inputs))
                return compute_loss(model, inputs, *a, **kw)

            def watched_forward(module, args, kwargs):
                ids = kwargs.get("input_ids", args[0] if args else None)
                mask = kwargs.get("attention_mask")
                for i, row in enumerate(ids.tolist()):
                    keep = mask[i].tolist() if mask is not None else [1] * len(row)
                    seen["forward"].append(tuple(t for t, k in zip(row, keep) if k))

            trainer.compute_loss = watched_loss
            trainer.model.register_forward_pre_hook(watched_forward, with_kwargs=True)
            if hasattr(trainer, "_generate_single_turn"):  # GRPO: the prompt ids it samples answers from
                generate = trainer._generate_single_turn

                def watched_generate(prompt_ids, *a, **kw):
                    seen["generate"].append([list(p) for p in prompt_ids])
                    return generate(prompt_ids, *a, **kw)

                trainer._generate_single_turn = watched_generate
            return trainer

        return make_and_watch

    for name, record in STAGES.items():
        monkeypatch.setitem(STAGES, name, dataclasses.replace(record, trainer=watching(record.trainer)))
    return seen


def _cfg(tiny_model_dir, tmp_path, stage, data, **kw):
    base = dict(model=str(tiny_model_dir), stage=stage, data=[str(data)], max_steps=1, save_steps=1,
                logging_steps=1, per_device_train_batch_size=8, lora_dropout=0.0, lora_rank=4,
                output_dir=str(tmp_path / stage), report_to=["none"], cutoff_len=256, seed=1, beta=0.5)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in PAIRS), encoding="utf-8")
    return path


def _tokenizer(folder):
    from finechat.models.resolve import load_model_and_tokenizer

    return load_model_and_tokenizer(str(folder), dtype="float32", device="cpu")[1]  # as the stage loads it


@pytest.fixture(scope="module")
def bos_model_dir(tmp_path_factory):
    """A tiny model whose tokenizer prepends a BOS and whose chat template writes one too (as Llama 3's do)."""
    from tiny import CHATML_TEMPLATE, make_tiny_llama, make_tokenizer
    from tokenizers import processors

    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"bos_token": "<s>"})
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.bos_token_id)])
    tokenizer.chat_template = "{{ bos_token }}" + CHATML_TEMPLATE
    folder = tmp_path_factory.mktemp("tiny-bos")
    make_tiny_llama(vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id
    return folder


@pytest.fixture(scope="module")
def glm_model_dir(tmp_path_factory):
    """The native ChatGLM-6B layout at a tiny size: [gMASK]<sop> go between prompt and answer."""
    from chatglm_tiny import write_fake_chatglm

    return write_fake_chatglm(tmp_path_factory.mktemp("glm") / "glm")


def _model(request, which: str):
    return request.getfixturevalue({"plain": "tiny_model_dir", "bos": "bos_model_dir", "glm": "glm_model_dir"}[which])


def _template(which: str, name: str | None, tokenizer):
    return get_template(name, tokenizer, "chatglm" if which == "glm" else None)


CASES = [("plain", None), ("plain", "vicuna"), ("bos", None)]


@pytest.mark.parametrize("which, template", CASES + [("glm", None)])
@pytest.mark.parametrize("stage", ["kto", "orpo", "simpo"])
def test_trainers_see_the_sft_ids_and_never_train_the_prompt(stage, which, template, request, pairs_file, tmp_path,
                                                             spy):
    tiny_model_dir = _model(request, which)
    tokenizer = _tokenizer(tiny_model_dir)
    chat = _template(which, template, tokenizer)
    expected = {_sft_row(tokenizer, chat, p["prompt"], p[side]) for p in PAIRS for side in ("chosen", "rejected")}
    if template == "vicuna":
        # "... ASSISTANT: " + "The": tokenized as one text the space merges into the answer's first token; SFT
        # tokenizes the prompt and the answer apart, as the chat engine does at inference
        prompt = chat.render([{"role": "user", "content": "What is the capital of France?"}])
        whole = tokenizer(prompt + "The capital", add_special_tokens=False)["input_ids"]
        assert whole[: len(tokenizer(prompt, add_special_tokens=False)["input_ids"])] != \
            tokenizer(prompt, add_special_tokens=False)["input_ids"]

    result = run_training(_cfg(tiny_model_dir, tmp_path, stage, pairs_file, template=template))
    assert result.global_step == 1

    batch = spy["batches"][0]
    rows = _batch_rows(stage, batch)
    assert rows == expected  # every sequence, SFT's ids, trained exactly where SFT trains
    for ids, trained in rows:
        assert not any(trained[:3]) and trained[-1]  # the prompt is never trained, the answer's end is
    for ids, _ in expected:
        assert ids in spy["forward"]  # what the model itself received


def test_cutoff_len_cuts_answers_and_counts_prompts_without_room(tiny_model_dir, tmp_path, spy):
    tokenizer = _tokenizer(tiny_model_dir)
    chat = get_template(None, tokenizer)
    long_prompt = "中国的首都是北京。" * 20
    data = tmp_path / "cut.jsonl"
    records = PAIRS[:2] + [{"prompt": long_prompt, "chosen": "北京。", "rejected": "巴黎。"}]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    prompt_len = max(len(_sft_row(tokenizer, chat, p["prompt"], p["chosen"])[0]) -
                     sum(_sft_row(tokenizer, chat, p["prompt"], p["chosen"])[1]) for p in PAIRS[:2])
    cutoff = prompt_len + 3
    assert len(tokenizer(long_prompt)["input_ids"]) > cutoff

    result = run_training(_cfg(tiny_model_dir, tmp_path, "orpo", data, cutoff_len=cutoff))
    run = json.loads((tmp_path / "orpo" / "finechat_run.json").read_text())
    assert run["data"]["no_room"] == 1 and run["data"]["train_rows"] == 2 and run["data"]["truncated"] >= 2
    rows = _batch_rows("orpo", spy["batches"][0])
    assert len(rows) == 4 and result.global_step == 1
    for ids, trained in rows:
        assert len(ids) <= cutoff and not trained[0] and trained[-1]
        full = next(r for p in PAIRS[:2] for r in (_sft_row(tokenizer, chat, p["prompt"], p["chosen"]),
                                                  _sft_row(tokenizer, chat, p["prompt"], p["rejected"]))
                    if r[0][: len(ids)] == ids)
        assert full[1][: len(ids)] == trained  # SFT's ids and masks, the answer cut at cutoff_len


@pytest.mark.parametrize("which, template", CASES)
def test_grpo_generates_from_the_sft_prompt_ids(which, template, request, tmp_path, spy):
    tiny_model_dir = _model(request, which)
    tokenizer = _tokenizer(tiny_model_dir)
    chat = get_template(template, tokenizer)
    data = tmp_path / "sft.jsonl"
    rows = [{"instruction": p["prompt"], "output": p["chosen"]} for p in PAIRS if isinstance(p["prompt"], str)]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    result = run_training(_cfg(tiny_model_dir, tmp_path, "grpo", data, template=template, per_device_train_batch_size=6,
                            num_generations=2, max_completion_length=4, rewards=["format"]))
    assert result.global_step == 1
    expected = set()
    for r in rows:
        ids, trained = _sft_row(tokenizer, chat, r["instruction"], r["output"])
        expected.add(ids[: trained.index(True)])
    if which == "bos":
        assert all(ids[0] == tokenizer.bos_token_id != ids[1] for ids in expected)  # one BOS
    assert {tuple(p) for p in spy["generate"][0]} == expected

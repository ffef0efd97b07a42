"""Helpers for the eval / export / stages tests: peft adapters and a tiny model taught a few answers."""

from __future__ import annotations

import json
from pathlib import Path

import torch

PAIRS = [
    ("类型#上衣*颜色#白色", "这件白色上衣简约大方。"),
    ("类型#裙*颜色#红色", "红色的裙子时尚又显瘦。"),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Hello, how are you today?", "I am fine, thank you."),
]


def write_alpaca(path: Path, pairs=PAIRS) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for q, a in pairs:
            fh.write(json.dumps({"instruction": q, "input": "", "output": a}, ensure_ascii=False) + "\n")
    return path


def make_adapter(base_dir, out_dir, kind: str = "lora", seed: int = 1) -> Path:
    """A peft adapter with non-zero random weights (a fresh LoRA has B = 0 and would change nothing)."""
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    if kind == "lora":
        config = LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "up_proj"],
                            init_lora_weights=False, task_type="CAUSAL_LM")
    else:
        config = PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    if kind == "lora":
        with torch.no_grad():  # a strong delta, so that greedy tokens really change
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
    peft_model.save_pretrained(out_dir)
    return Path(out_dir)


def teach_lora(base_dir, out_dir, pairs=PAIRS, steps: int = 80) -> Path:
    """A LoRA adapter trained (plain torch loop, seconds) to give ``pairs``' answers under the chat template."""
    from peft import LoraConfig, get_peft_model

    import finechat
    from finechat.eval.predict import label_token_ids

    torch.manual_seed(0)
    bot = finechat.load(str(base_dir))
    model = get_peft_model(bot.model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj", "up_proj",
                                                                                      "down_proj"],
                                                 task_type="CAUSAL_LM"))
    rows = [label_token_ids(bot, [{"role": "user", "content": q}], a) for q, a in pairs]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    for _ in range(steps):
        for ids, labels in rows:
            loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
            loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(out_dir)
    return Path(out_dir)


def greedy_by_generate(bot, query: str, max_new_tokens: int) -> str:
    """The greedy answer to ``query`` computed with transformers' ``generate`` on ``bot.model`` -- not with
    finechat's own decoding loop -- to check what ``bot.chat(..., greedy=True)`` answers against."""
    ids = bot.encode_prompt(bot.build_prompt([{"role": "user", "content": query}]))
    input_ids = torch.tensor([ids], device=bot.model.device)
    with torch.no_grad():
        out = bot.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=bot.stop_token_ids(),
                                 pad_token_id=bot.tokenizer.pad_token_id)
    text = bot.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).rstrip("\ufffd")
    for stop in bot.template.stops(bot.eos_token):
        text = text.split(stop, 1)[0] if stop else text
    return bot.postprocess(text)


def train_log_losses(output_dir: Path) -> list[float]:
    """The training losses a run wrote to its ``train_log.jsonl``, step by step."""
    rows = [json.loads(line) for line in (Path(output_dir) / "train_log.jsonl").read_text().splitlines() if line]
    return [row["loss"] for row in rows if "loss" in row]

"""A fake THUDM/chatglm-6b folder: tokenizer, loading with no remote code, chat, LoRA and P-Tuning v2 training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from chatglm_tiny import write_fake_chatglm
from eval_helpers import greedy_by_generate, train_log_losses


@pytest.fixture(scope="module")
def glm_dir(tmp_path_factory) -> Path:
    return write_fake_chatglm(tmp_path_factory.mktemp("glm") / "chatglm-6b", init_std=0.5)


@pytest.fixture(scope="module")
def glm_bot(glm_dir):
    import finechat

    return finechat.load(str(glm_dir))


def test_tokenizer_layout_and_whitespace(glm_bot):
    tok = glm_bot.tokenizer
    assert type(tok).__name__ == "ChatGLMTokenizer" and tok.padding_side == "left"
    vocab = tok.get_vocab()
    # the published layout: [MASK] [gMASK] [sMASK] <unused_0> <sop> <eop> in a row, <pad> = 3
    assert [vocab[t] - vocab["[MASK]"] for t in ("[gMASK]", "[sMASK]", "<sop>", "<eop>")] == [1, 2, 4, 5]
    assert tok.pad_token_id == 3 and tok.bos_token_id == vocab["<sop>"] and tok.eos_token_id == vocab["<eop>"]
    text = "第一行\n\tx    y"
    pieces = tok.tokenize(text)
    assert "<n>" in pieces and "<|tab|>" in pieces and "<|blank_4|>" in pieces
    ids = tok(text)["input_ids"]
    assert ids[-2:] == [tok.gmask_token_id, tok.bos_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(ids).endswith("[gMASK]<sop>")
    assert tok.build_inputs_with_special_tokens([7, 8], [9]) == [7, 8, tok.gmask_token_id, tok.bos_token_id, 9,
                                                                 tok.eos_token_id]
    batch = tok(["你好", "你好世界 ok"], padding=True)
    assert batch["input_ids"][0][0] == tok.pad_token_id and batch["attention_mask"][0][0] == 0


def test_loads_without_remote_code_and_matches_the_shards(glm_dir, glm_bot):
    from finechat.models.chatglm.modeling_chatglm import ChatGLMForConditionalGeneration

    model = glm_bot.model
    assert isinstance(model, ChatGLMForConditionalGeneration) and glm_bot.template.name == "chatglm"
    index = json.loads((glm_dir / "pytorch_model.bin.index.json").read_text())
    shards = {}
    for name in set(index["weight_map"].values()):
        shards.update(torch.load(glm_dir / name, weights_only=True))
    own = model.state_dict()
    for key, value in shards.items():
        if "inv_freq" in key:
            continue
        assert torch.equal(own[key], value.float()), key
    # ChatModel.encode_prompt adds [gMASK] <sop> after the prompt, as the reference's chat does
    prompt = glm_bot.build_prompt([{"role": "user", "content": "你好"}])
    assert prompt == "[Round 0]\n问：你好\n答："
    ids = glm_bot.encode_prompt(prompt)
    tok = glm_bot.tokenizer
    assert ids == tok(prompt, add_special_tokens=False)["input_ids"] + [tok.gmask_token_id, tok.bos_token_id]


def test_chat_and_stream_chat(glm_bot):
    assert dict(glm_bot.template.generation_defaults) == {"max_length": 2048, "top_p": 0.7, "temperature": 0.95}
    response, history = glm_bot.chat("你好", [], greedy=True, max_new_tokens=6)
    assert history == [("你好", response)]
    streamed = [r for r, _ in glm_bot.stream_chat("你好", [], greedy=True, max_new_tokens=6)]
    assert streamed[-1] == response
    # the model's own ChatGLM-6B API
    response2, history2 = glm_bot.model.chat(glm_bot.tokenizer, "你好", [], do_sample=False, max_new_tokens=6)
    assert (response2, history2) == (response, history)
    streamed2 = [r for r, _ in glm_bot.model.stream_chat(glm_bot.tokenizer, "你好", [], do_sample=False,
                                                          max_new_tokens=6)]
    assert streamed2[-1] == response


def test_terminal_chat_command(glm_dir):
    proc = subprocess.run([sys.executable, "-m", "finechat", "chat", "--model", str(glm_dir), "--greedy",
                           "--max-new-tokens", "4"], input="你好\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "remote code" not in proc.stderr


def _train(glm_dir: Path, out: Path, method: str, data: Path, extra: list[str]) -> None:
    from finechat.cli import main

    # in-process (the same code path as the `finechat train` command, without a second interpreter start-up)
    code = main(["train", f"model={glm_dir}", f"method={method}", f"data={data}", f"output_dir={out}",
                 "max_steps=3", "save_steps=3", "logging_steps=1", "per_device_train_batch_size=2",
                 "learning_rate=0.01", "cutoff_len=64", *extra])
    assert code == 0


@pytest.fixture(scope="module")
def adgen(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "adgen.json"
    rows = [{"content": f"类型#上衣*颜色#白色*编号#{i}", "summary": "这件外套采用简约的设计，白色的颜色。"} for i in range(8)]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    return path


def test_lora_on_query_key_value_trains_and_chats(glm_dir, glm_bot, adgen, tmp_path):
    import finechat

    out = tmp_path / "lora"
    _train(glm_dir, out, "lora", adgen, ["lora_target=query_key_value", "prompt_column=content",
                                         "response_column=summary"])
    ckpt = out / "checkpoint-3"
    config = json.loads((ckpt / "adapter_config.json").read_text())
    assert config["target_modules"] == ["query_key_value"] or set(config["target_modules"]) == {"query_key_value"}
    losses = train_log_losses(out)
    assert len(losses) == 3 and losses[-1] < losses[0]
    bot = finechat.load(str(glm_dir), adapter=str(ckpt))
    ids = torch.tensor([bot.encode_prompt(bot.build_prompt([{"role": "user", "content": "类型#上衣"}]))])
    with torch.no_grad():  # the trained adapter is applied (a fresh LoRA, B = 0, would change nothing)
        assert not torch.allclose(bot.model(ids).logits, glm_bot.model(ids).logits)
    response, _ = bot.chat("类型#上衣", [], greedy=True, max_new_tokens=8)
    assert response == greedy_by_generate(bot, "类型#上衣", 8)


def test_ptuning_trains_saves_chatglm_format_and_reloads(glm_dir, adgen, tmp_path):
    import finechat

    out = tmp_path / "pt"
    _train(glm_dir, out, "ptuning", adgen, ["pre_seq_len=4", "prompt_column=content", "response_column=summary"])
    ckpt = out / "checkpoint-3"
    state = torch.load(ckpt / "pytorch_model.bin", weights_only=True)
    assert list(state) == ["transformer.prefix_encoder.embedding.weight"]
    assert json.loads((ckpt / "config.json").read_text())["pre_seq_len"] == 4
    bot = finechat.load(str(glm_dir), adapter=str(ckpt))
    assert bot.model.transformer.prefix_encoder is not None
    # loading the same checkpoint the way ChatGLM-6B's ptuning/main.py does gives identical logits
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(glm_dir)
    config.pre_seq_len = 4
    model = AutoModel.from_pretrained(glm_dir, config=config, dtype=torch.float32).eval()
    prefix = {k[len("transformer.prefix_encoder."):]: v for k, v in state.items()}
    model.transformer.prefix_encoder.load_state_dict(prefix)
    ids = torch.tensor([bot.encode_prompt("你好")])
    assert torch.equal(model(ids).logits, bot.model(ids).logits)
    base = finechat.load(str(glm_dir)).model
    assert not torch.equal(base(ids).logits, bot.model(ids).logits)


def test_blank_infilling_pretraining_lowers_the_loss_and_its_checkpoint_reloads(glm_dir, glm_bot, tmp_path):
    import finechat
    from finechat.data.blank_infilling import BlankInfillingCollator, blank_infilling_examples
    from finechat.models.chatglm.modeling_chatglm import ChatGLMForConditionalGeneration

    documents = ["今天天气很好。我们去公园散步。公园里有很多花。"] * 6
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(documents) + "\n")
    out = tmp_path / "pretrain"
    _train(glm_dir, out, "full", corpus, ["stage=pretrain", "objective=blank_infilling"])
    losses = train_log_losses(out)
    assert len(losses) == 3 and losses[-1] < losses[0]
    trained = finechat.load(str(out / "checkpoint-3"))
    assert isinstance(trained.model, ChatGLMForConditionalGeneration)
    # the reloaded weights are the trained ones: the blank-infilling loss on the corpus is below the base's
    tok = glm_bot.tokenizer
    rows, _ = blank_infilling_examples(documents[:2], tok)
    batch = BlankInfillingCollator(tok.pad_token_id)(rows)
    with torch.no_grad():
        base_loss, trained_loss = glm_bot.model(**batch).loss, trained.model(**batch).loss
    assert torch.isfinite(trained_loss) and trained_loss < base_loss


def test_serves_chatglm_over_http(glm_bot):
    import httpx
    from serve_helpers import LiveServer

    from finechat.serve.api import ServeSettings, create_app

    server = LiveServer(create_app(glm_bot, ServeSettings(model_name="chatglm-6b")))
    try:
        expected, _ = glm_bot.chat("你好", [], greedy=True, max_new_tokens=5)
        r = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
            "model": "chatglm-6b", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 5,
            "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == expected
    finally:
        server.stop()


def test_quantization_bit_at_load_and_int4_folder_round_trip(glm_dir, tmp_path):
    import finechat
    from finechat.models.chatglm.quantization import QuantizedLinear

    bot = finechat.load(str(glm_dir), quantization_bit=4)
    qkv = bot.model.transformer.layers[0].attention.query_key_value
    assert isinstance(qkv, QuantizedLinear) and qkv.weight.dtype == torch.int8
    answer, _ = bot.chat("你好", [], greedy=True, max_new_tokens=5)
    bot.model.save_pretrained(tmp_path / "chatglm-6b-int4")
    bot.tokenizer.save_pretrained(tmp_path / "chatglm-6b-int4")
    assert json.loads((tmp_path / "chatglm-6b-int4" / "config.json").read_text())["quantization_bit"] == 4
    again = finechat.load(str(tmp_path / "chatglm-6b-int4"))
    assert isinstance(again.model.transformer.layers[1].mlp.dense_4h_to_h, QuantizedLinear)
    assert again.chat("你好", [], greedy=True, max_new_tokens=5)[0] == answer


def test_data_preview_blank_infilling(glm_dir, tmp_path, capsys):
    from finechat.cli import main

    corpus = tmp_path / "c.txt"
    corpus.write_text("今天天气很好。我们去公园散步。公园里有很多花。\nThe quick brown fox jumps over the lazy dog.\n")
    assert main(["data", "preview", "--objective", "blank_infilling", "--model", str(glm_dir), "-n", "2",
                 str(corpus)]) == 0
    out = capsys.readouterr().out
    assert out.count("=== document") == 2 and "Part A" in out and "<sop>" in out and "position" in out


def test_ptuning_on_an_int4_base_uses_chatglm_quantization(glm_dir, adgen, tmp_path):
    """ChatGLM-6B's ptuning/train.sh runs with --quantization_bit 4: model.quantize(4), not bitsandbytes."""
    out = tmp_path / "pt4"
    _train(glm_dir, out, "ptuning", adgen, ["pre_seq_len=4", "quantization_bit=4", "prompt_column=content",
                                            "response_column=summary"])
    ckpt = out / "checkpoint-3"
    state = torch.load(ckpt / "pytorch_model.bin", weights_only=True)
    assert list(state) == ["transformer.prefix_encoder.embedding.weight"]
    assert json.loads((ckpt / "config.json").read_text())["quantization_bit"] == 4

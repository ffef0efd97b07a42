"""Tiny models and tokenizers built in code for tests: nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Hello, how are you today? I am fine, thank you.",
    "The quick brown fox jumps over the lazy dog.",
    "Write a short poem about the sea and the sky.",
    "Below is an instruction that describes a task.",
    "### Instruction:\n### Response:\n### Input:\n",
    "你好，我是一个人工智能助手。很高兴认识你！",
    "中国的首都是北京。法国的首都是巴黎。",
    "类型#上衣*颜色#白色*风格#简约*图案#刺绣*衣样式#外套",
    "这件外套采用简约的设计，白色的颜色搭配精致的刺绣图案，时尚又大方。",
    "[Round 0]\n问：你好\n答：你好！有什么可以帮你？",
    "下面是一个问题，运用医学知识来正确回答提问。感冒的症状有发热、咳嗽、流鼻涕。",
    "Calculate(1+2) Solve(x^2=4) Search(weather) Text2Image(cat)",
    "0123456789 + - * / = ( ) [ ] { } , . ; : ! ?",
]

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>",
    "<eoh>", "<eom>", "<eot>", "<eoc>", "<eor>",
]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def make_tokenizer(chat_template: bool = True):
    """A byte-level BPE tokenizer trained on CORPUS (well under a second), round-tripping Chinese."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>", bos_token=None, unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:3] + SPECIAL_TOKENS[4:],
    )
    if chat_template:
        fast.chat_template = CHATML_TEMPLATE
    return fast


def make_tiny_llama(hidden: int = 64, layers: int = 2, vocab_size: int = 600, seed: int = 0,
                    initializer_range: float = 0.02):
    """A random tiny Llama; a wide ``initializer_range`` (0.3) makes its greedy answers depend on the prompt."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        initializer_range=initializer_range,
    )
    return LlamaForCausalLM(config).eval()


def save_tiny_model(folder: Path, hidden: int = 64, layers: int = 2, chat_template: bool = True, seed: int = 0,
                    initializer_range: float = 0.02) -> Path:
    """Write a complete tiny Hugging Face model folder (config, safetensors, tokenizer)."""
    tokenizer = make_tokenizer(chat_template)
    model = make_tiny_llama(hidden, layers, vocab_size=len(tokenizer), seed=seed, initializer_range=initializer_range)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder

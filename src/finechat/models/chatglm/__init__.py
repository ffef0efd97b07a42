"""Native ChatGLM-6B (THUDM/chatglm-6b): configuration, model, tokenizer and ChatGLM-format quantization.

Importing the submodules is cheap for the configuration; the model and the tokenizer import torch and
sentencepiece. ``register.register_chatglm()`` makes the Auto classes load an original chatglm-6b folder
without its remote code.
"""

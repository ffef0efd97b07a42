import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import save_tiny_model  # noqa: E402


@pytest.fixture(autouse=True)
def split_tiny_linear_layers(monkeypatch):
    """Real models' fp32 CPU Linear layers run as row chunks on the fast path (finechat.models.row_split); the
    tiny test models' layers are under the size where that starts, so tests lower it to take that path."""
    monkeypatch.setattr("finechat.models.row_split.MIN_SPLIT_WEIGHTS", 0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama folder (2 layers, hidden 64) with a byte-level BPE tokenizer and a ChatML template."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_bot(tiny_model_dir):
    import finechat

    return finechat.load(str(tiny_model_dir))


@pytest.fixture(scope="module")
def torch_bot():
    """finechat's PyTorch engine on the default model in float32: the reference of the real-vLLM tests."""
    import finechat

    return finechat.load("default", dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def vllm_bot():
    """The default model on vLLM (float32 on a CPU): one child server per module, stopped after it."""
    import finechat

    with finechat.load("default", engine="vllm") as bot:
        yield bot


def pytest_collection_modifyitems(config, items):
    # CI=true runs everything; FINECHAT_FAST_TESTS=1 skips the slow real-model tests locally.
    if os.environ.get("FINECHAT_FAST_TESTS") == "1":
        skip = pytest.mark.skip(reason="FINECHAT_FAST_TESTS=1")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if gpu_items:
        import torch

        if not torch.cuda.is_available():
            for item in gpu_items:
                item.add_marker(pytest.mark.skip(reason="needs CUDA"))

"""What the tests on real vLLM share: why they skip (their fixtures ``torch_bot`` and ``vllm_bot`` are in conftest.py)."""

import pytest

from finechat.errors import ModelLoadError
from finechat.generate.vllm_server import find_vllm_python

try:
    find_vllm_python()
    VLLM_MISSING = None
except ModelLoadError as e:
    VLLM_MISSING = str(e)

# the marks of a module of real-vLLM tests: skipped, with the reason shown, where vLLM is not installed
REAL_VLLM = [pytest.mark.slow, pytest.mark.skipif(VLLM_MISSING is not None, reason=VLLM_MISSING or "")]


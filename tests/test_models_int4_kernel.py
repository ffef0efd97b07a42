"""finechat's INT4 x INT8 CPU kernel: its weight layout, its arithmetic against a plain-torch emulation of the
same rounding and against the float product, and the fall-back to PyTorch's kernel where it cannot be built."""

from __future__ import annotations

import logging

import pytest
import torch

from finechat.models import int4_kernel
from finechat.models.chatglm.quantization import QuantizedLinear

needs_kernel = pytest.mark.skipif(not int4_kernel.available(), reason="finechat's INT4 kernel does not build here")


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """An empty kernel cache and a forgotten build, restored afterwards (the next use loads the real one again)."""
    monkeypatch.setenv("FINECHAT_HOME", str(tmp_path / "home"))
    int4_kernel._library.cache_clear()
    int4_kernel._warn_once.cache_clear()
    yield tmp_path / "home" / "kernels"
    monkeypatch.undo()
    int4_kernel._library.cache_clear()


def test_block_layout_puts_input_j_low_and_j_plus_64_high():
    codes = (torch.arange(2 * 256) % 16).reshape(2, 256).to(torch.uint8)
    packed = int4_kernel.to_blocks(codes)
    assert packed.shape == (2, 128)
    for row in range(2):
        for block in range(2):
            for j in (0, 5, 63):
                byte = int(packed[row, block * 64 + j])
                assert byte & 0x0F == codes[row, block * 128 + j]
                assert byte >> 4 == codes[row, block * 128 + 64 + j]
    assert torch.equal(int4_kernel.from_blocks(packed), codes)


def emulate(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The kernel's arithmetic in float64: x rounded to int8 per block of 128 (absmax / 127), then exact sums."""
    rows, width = x.shape
    blocks = x.double().reshape(rows, width // 128, 128)
    step = blocks.abs().amax(-1, keepdim=True) / 127
    xq = torch.where(step > 0, torch.round(blocks / step), torch.zeros_like(blocks)) * step
    out = xq.reshape(rows, width) @ (codes.double() - 8).T * scale.double()
    return out + bias.double() if bias is not None else out


@needs_kernel
@pytest.mark.parametrize("rows,out,width", [(1, 37, 256), (3, 96, 384), (5, 16, 128)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matmul_is_the_int8_rounded_product(rows, out, width, with_bias):
    generator = torch.Generator().manual_seed(rows * out + width)
    codes = torch.randint(0, 16, (out, width), dtype=torch.uint8, generator=generator)
    x = torch.randn(rows, width, generator=generator) * torch.linspace(0.1, 3, width)  # uneven magnitudes
    x[0, :128] = 0  # an all-zero block (scale 0) must give 0, not NaN
    scale = torch.rand(out, generator=generator) * 0.1
    bias = torch.randn(out, generator=generator) if with_bias else None
    y = int4_kernel.matmul(x, int4_kernel.to_blocks(codes), scale, bias)
    assert y.shape == (rows, out) and y.dtype == torch.float32
    expected = emulate(x, codes, scale, bias)
    assert torch.allclose(y.double(), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    exact = x.double() @ (codes.double() - 8).T * scale.double() + (bias.double() if bias is not None else 0)
    assert (y.double() - exact).norm() <= 0.02 * exact.norm()  # int8 activations: well under 2% off


@needs_kernel
def test_matmul_refuses_a_weight_of_the_wrong_width():
    codes = int4_kernel.to_blocks(torch.zeros(16, 256, dtype=torch.uint8))
    with pytest.raises(ValueError, match="bad shapes"):
        int4_kernel.matmul(torch.randn(1, 128), codes, torch.ones(16), None)


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(int4_kernel.ENV, "torch")
    assert not int4_kernel.available()
    layer = QuantizedLinear.from_linear(torch.nn.Linear(256, 32), 4)
    with torch.no_grad():
        layer(torch.randn(1, 256))
    assert layer.layout == "cpu_int4pack"


@pytest.mark.parametrize("compiler,why", [("/nonexistent/cc", "no C compiler"), ("false", "failed")])
def test_without_a_working_compiler_pytorchs_kernel_is_used(compiler, why, fresh_build, monkeypatch, caplog):
    monkeypatch.setenv("CC", compiler)
    with caplog.at_level(logging.WARNING, logger="finechat.models.int4_kernel"):
        assert not int4_kernel.available()
    assert why in caplog.text and "PyTorch's INT4 kernel is used" in caplog.text
    linear = torch.nn.Linear(256, 32)
    layer = QuantizedLinear.from_linear(linear, 4)
    with torch.no_grad():
        out = layer(torch.randn(2, 256))
    assert layer.layout == "cpu_int4pack" and out.shape == (2, 32)


@needs_kernel
def test_a_fresh_cache_builds_the_kernel_once(fresh_build):
    assert int4_kernel.available()
    built = list(fresh_build.glob("int4_gemv-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    int4_kernel._library.cache_clear()
    assert int4_kernel.available() and built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt
    assert list(fresh_build.iterdir()) == built  # no temporary left

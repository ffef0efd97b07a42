"""finechat's INT4 x INT8 CPU kernel: its weight layout, its arithmetic against a plain-torch emulation of the
same rounding and against the float product, and the fall-back to PyTorch's kernel where it cannot be built."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

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
    assert sorted(fresh_build.iterdir()) == [built[0], built[0].with_name(built[0].name + ".sha256")]  # no temporary


def _plant(tmp_path, target, marker=None, with_kernel=False):
    """Compile a stand-in library over ``target``: its constructor writes ``marker`` when it is loaded."""
    source = tmp_path / "planted.c"
    body = ['#include <stdio.h>']
    if marker:
        body.append(f'__attribute__((constructor)) static void planted(void) {{ FILE *f = fopen("{marker}", "w"); '
                    'if (f) fclose(f); }')
    body.append("int q4_isa(void) { return 1; }" if with_kernel else "int something_else(void) { return 0; }")
    source.write_text("\n".join(body) + "\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(target), str(source)], check=True)


def _available_in_child(home):
    """available() in a fresh process (dlopen keeps a loaded library by its path, so a test must not reuse ours)."""
    code = ("import logging, sys; logging.basicConfig(level=logging.WARNING)\n"
            "from finechat.models import int4_kernel\nprint(int4_kernel.available())")
    env = {**os.environ, "FINECHAT_HOME": str(home)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().splitlines()[-1] == "True", result.stderr


@needs_kernel
def test_a_planted_library_is_rebuilt_never_loaded(fresh_build, tmp_path):
    assert int4_kernel.available()
    (target,) = fresh_build.glob("int4_gemv-*.so")
    marker = tmp_path / "constructor-ran"
    _plant(tmp_path, target, marker)
    ok, log_text = _available_in_child(fresh_build.parent)
    assert ok and not marker.exists() and "does not match the hash recorded" in log_text
    assert int4_kernel._digest(target) == target.with_name(target.name + ".sha256").read_text().strip()


@needs_kernel
def test_a_library_without_the_kernel_falls_back(fresh_build, tmp_path):
    assert int4_kernel.available()
    (target,) = fresh_build.glob("int4_gemv-*.so")
    _plant(tmp_path, target)
    record = target.with_name(target.name + ".sha256")  # a record that matches: only the symbol check is left
    record.write_text(int4_kernel._digest(target) + "\n")
    ok, log_text = _available_in_child(fresh_build.parent)
    assert not ok and "does not load as the kernel" in log_text and "PyTorch's INT4 kernel is used" in log_text
    assert "Traceback" not in log_text


@needs_kernel
@pytest.mark.parametrize("mode", [0o775, 0o777])
def test_a_cache_others_can_write_is_refused(fresh_build, tmp_path, mode):
    assert int4_kernel.available()
    (target,) = fresh_build.glob("int4_gemv-*.so")
    marker = tmp_path / "constructor-ran"
    _plant(tmp_path, target, marker, with_kernel=True)
    target.with_name(target.name + ".sha256").write_text(int4_kernel._digest(target) + "\n")
    fresh_build.chmod(mode)
    ok, log_text = _available_in_child(fresh_build.parent)
    assert not ok and "writable by its group or by everyone" in log_text and not marker.exists()
    fresh_build.chmod(0o700)
    target.chmod(0o666)  # the file itself open to others: not loaded, rebuilt
    ok, log_text = _available_in_child(fresh_build.parent)
    assert ok and not marker.exists() and "does not match the hash recorded" in log_text

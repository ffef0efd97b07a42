"""An INT4 x INT8 matrix-vector kernel for x86 CPUs (AVX512-VNNI or AVX2), compiled at first use.

Why our own: decoding a 4-bit model on a CPU is a matrix-vector product per layer, whose speed limit is the
memory bandwidth. PyTorch's ``torch._weight_int4pack_mm_for_cpu`` turns every weight into a float and
multiplies in floats: on 2 cores that is compute-bound and streams about half the bandwidth (18-19 GB/s of
~35 measured here, ``benchmarks/chatglm_memory.py``). Its x86 alternative ``torch._dyn_quant_matmul_4bit``
is a reference loop there (fast on ARM only), torch.compile does not lower the INT4 op, torchao's weight-only CPU
INT4 calls the same PyTorch kernel, and bitsandbytes / llama.cpp do not run ChatGLM-6B's own layers and format.
The arithmetic is llama.cpp's Q4 x Q8 idea (facts, not code): the activations are quantized to int8 per
block of 128 (scale = absmax / 127), and integer dot products of the unsigned 4-bit codes (0..15) with them
run in the CPU's int8 instructions (``vpdpbusd``; AVX2: ``vpmaddubsw`` + ``vpmaddwd``), 64 weights an
instruction. Measured per 4096 x 16384 layer streamed from memory: ~35 GB/s against PyTorch's ~19.

Weight layout (:func:`to_blocks`): per output row, blocks of 128 inputs in 64 bytes; byte ``j`` of a block
holds input ``j`` in its low nibble and input ``j + 64`` in its high nibble, as ``code = q + 8`` of a signed
4-bit ``q``. The product is ``y = scale_row * sum(q * x) + bias`` with ``sum((code - 8) * x)`` =
``sum(code * x) - 8 * sum(x)``: the second term is one number per token, shared by all rows.

The C source below is compiled with the system's ``gcc`` (``-O3 -march=native -fopenmp``) into
``$FINECHAT_HOME/kernels/`` (once per source, compiler and CPU; a few tenths of a second), its SHA-256 kept
beside it, and loaded with ctypes only when the folder and files are the user's own, writable by no one else,
and the hash still matches (see :func:`_library`); it links the OpenMP runtime PyTorch has already loaded, so it runs on PyTorch's threads, as many as
``torch.get_num_threads()``. Without a C compiler, on another architecture or CPU, or with
``FINECHAT_INT4_KERNEL=torch``, :func:`available` is False and callers use PyTorch's kernel. Rounding the
activations to int8 changes a layer's output by ~0.5% (relative norm), far below the 4-bit weights' own error.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import torch

from finechat.config import finechat_home
from finechat.errors import FinechatError
from finechat.files import atomic_file

log = logging.getLogger(__name__)

BLOCK = 128  # inputs per activation scale and per weight block (64 bytes)
ENV = "FINECHAT_INT4_KERNEL"  # "torch": always PyTorch's kernel

SOURCE = r"""
#include <stdint.h>
#include <math.h>
#include <immintrin.h>

#define BLOCK 128

/* x [K] fp32 -> xq [K] int8 per block of 128, xs [K/128] scale; returns sum_b xs[b] * sum(xq in b) */
static float quantize_row(const float *x, int K, int8_t *xq, float *xs) {
    float corr = 0.f;
    for (int b = 0; b < K / BLOCK; b++) {
        const float *xb = x + b * BLOCK;
        float amax = 0.f;
        for (int i = 0; i < BLOCK; i++) { float a = fabsf(xb[i]); amax = a > amax ? a : amax; }
        float s = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
        int sum = 0;
        for (int i = 0; i < BLOCK; i++) { int q = (int)lrintf(xb[i] * inv); xq[b * BLOCK + i] = (int8_t)q; sum += q; }
        xs[b] = s;
        corr += s * (float)sum;
    }
    return corr;
}

static inline float row_dot(const uint8_t *w, const int8_t *xq, const float *xs, int nb) {
#if defined(__AVX512VNNI__) && defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    const __m512i mask = _mm512_set1_epi8(0x0F);
    for (int b = 0; b < nb; b++) {
        __m512i v = _mm512_loadu_si512((const void *)(w + b * 64));
        __m512i lo = _mm512_and_si512(v, mask);
        __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
        __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512((const void *)(xq + b * BLOCK)));
        d = _mm512_dpbusd_epi32(d, hi, _mm512_loadu_si512((const void *)(xq + b * BLOCK + 64)));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(xs[b]), acc);
    }
    return _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__)
    __m256 acc = _mm256_setzero_ps();
    const __m256i mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    for (int b = 0; b < nb; b++) {
        __m256i d = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(w + b * 64 + h * 32));
            __m256i lo = _mm256_and_si256(v, mask);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
            __m256i xl = _mm256_loadu_si256((const __m256i *)(xq + b * BLOCK + h * 32));
            __m256i xh = _mm256_loadu_si256((const __m256i *)(xq + b * BLOCK + 64 + h * 32));
            d = _mm256_add_epi32(d, _mm256_madd_epi16(_mm256_maddubs_epi16(lo, xl), ones));
            d = _mm256_add_epi32(d, _mm256_madd_epi16(_mm256_maddubs_epi16(hi, xh), ones));
        }
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(xs[b]), acc);
    }
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
#else
#error "needs AVX2 or AVX512-VNNI"
#endif
}

/* y[m, n] = scale[n] * sum_k (u[n, k] - 8) * x[m, k] + bias[n]; u = 4-bit values in blocks of 128 (64 bytes:
   low nibble of byte j = element j, high nibble = element j + 64). work: M * K int8 + M * K / 128 floats. */
void q4_gemm(const float *x, int M, int K, const uint8_t *w, int N, const float *scale, const float *bias,
             float *y, int8_t *xq, float *xs, float *corr, int threads) {
    const int nb = K / BLOCK;
    for (int m = 0; m < M; m++) corr[m] = quantize_row(x + (int64_t)m * K, K, xq + (int64_t)m * K, xs + (int64_t)m * nb);
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int n = 0; n < N; n++) {
        const uint8_t *wn = w + (int64_t)n * (K / 2);
        for (int m = 0; m < M; m++) {
            float dot = row_dot(wn, xq + (int64_t)m * K, xs + (int64_t)m * nb, nb);
            y[(int64_t)m * N + n] = scale[n] * (dot - 8.f * corr[m]) + (bias ? bias[n] : 0.f);
        }
    }
}

int q4_isa(void) {
#if defined(__AVX512VNNI__) && defined(__AVX512F__)
    return 512;
#else
    return 256;
#endif
}
"""


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1]
    except OSError:
        pass
    return ""


def _unsafe(path: Path) -> str:
    """Why ``path`` may not be trusted to hold code we load ("" when it may): it must be ours, not a symbolic link,
    and writable by no one else, or another user could swap the kernel for their own code."""
    try:
        st = path.lstat()
    except OSError as e:
        return f"{path}: {e.strerror or e}"
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link"
    if st.st_uid != os.getuid():
        return f"{path} belongs to another user (uid {st.st_uid})"
    if st.st_mode & 0o022:
        return f"{path} is writable by its group or by everyone (mode {stat.S_IMODE(st.st_mode):o})"
    return ""


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _build(compiler: str, options: list[str], folder: Path, target: Path, record: Path) -> str:
    """Compile SOURCE into ``target`` and keep its SHA-256 in ``record`` (both atomic); returns why not, or ""."""
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        source = Path(tmp) / "int4_gemv.c"
        source.write_text(SOURCE)
        built = Path(tmp) / target.name
        result = subprocess.run([compiler, *options, "-o", str(built), str(source), "-lm"],
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            return f"{compiler} failed: {result.stderr.strip()[-500:]}"
        os.chmod(built, 0o700)
        os.replace(built, target)  # atomic: another process building the same file is harmless
        with atomic_file(record) as fh:
            fh.write(_digest(target) + "\n")
        os.chmod(record, 0o600)
    return ""


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded kernel, "") or (None, why not); built once per process, cached on disk.

    The cache is trusted only as far as it can be verified: the folder and files must be ours and writable by no
    one else, and the library's SHA-256 must match the one recorded beside it when we built it. A file that
    fails the hash (planted, damaged, half-copied) is rebuilt, never loaded; anything else amiss (an unsafe
    folder, a library without ``q4_gemm``) falls back to PyTorch's kernel."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"an x86-64 CPU is needed (this is {platform.machine()})"
    flags = set(_cpu_flags().split())
    if "avx2" not in flags or "fma" not in flags:
        return None, "the CPU has no AVX2 / FMA"
    compiler = shutil.which(os.environ.get("CC") or "gcc")
    if compiler is None:
        return None, "no C compiler (gcc) found"
    options = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"{compiler} does not run: {e}"
    key = hashlib.sha256("\0".join([SOURCE, version, " ".join(options), " ".join(sorted(flags))]).encode())
    folder = finechat_home() / "kernels"
    target = folder / f"int4_gemv-{key.hexdigest()[:16]}.so"
    record = folder / f"{target.name}.sha256"
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        why = _unsafe(folder.resolve())
        if why:
            return None, f"the kernel cache is not safe to load code from: {why}"
        recorded = record.read_text().strip() if record.is_file() and not _unsafe(record) else None
        if not (target.exists() and not _unsafe(target) and recorded == _digest(target)):
            if target.exists() or target.is_symlink():
                log.warning("INT4 kernel: %s does not match the hash recorded when it was built; rebuilding it",
                            target)
            why = _build(compiler, options, folder, target, record)
            if why:
                return None, why
        why = _unsafe(target) or _unsafe(record)
        if why or record.read_text().strip() != _digest(target):
            return None, f"{target} does not match its recorded hash{f' ({why})' if why else ''}"
    except (OSError, subprocess.SubprocessError, FinechatError) as e:
        return None, f"could not build it in {folder}: {e}"
    try:
        lib = ctypes.CDLL(str(target))
        p, i = ctypes.c_void_p, ctypes.c_int
        lib.q4_gemm.argtypes = [p, i, i, p, i, p, p, p, p, p, p, i]
        lib.q4_gemm.restype = None
        lib.q4_isa.restype = i
    except (OSError, AttributeError) as e:  # AttributeError: a library without the kernel's functions
        return None, f"{target} does not load as the kernel: {e}"
    log.info("INT4 kernel: %s (%s-bit vectors)", target, lib.q4_isa())
    return lib, ""


def available() -> bool:
    """Whether :func:`matmul` can run here (and is not turned off with FINECHAT_INT4_KERNEL=torch)."""
    if os.environ.get(ENV, "").lower() == "torch":
        return False
    lib, why = _library()
    if lib is None:
        _warn_once(why)
    return lib is not None


@functools.cache
def _warn_once(why: str) -> None:
    log.warning("the INT4 CPU kernel is not available (%s): PyTorch's INT4 kernel is used", why)


def supports(in_features: int) -> bool:
    return in_features % BLOCK == 0


def to_blocks(codes: torch.Tensor) -> torch.Tensor:
    """[out, in] uint8 codes 0..15 -> [out, in / 2] uint8 in the kernel's layout (see the module docstring)."""
    out, width = codes.shape
    blocks = codes.to(torch.uint8).reshape(out, width // BLOCK, 2, BLOCK // 2)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(out, width // 2)


def from_blocks(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_blocks`: [out, in / 2] -> [out, in] uint8 codes 0..15."""
    out, half = packed.shape
    blocks = packed.view(torch.uint8).reshape(out, half * 2 // BLOCK, 1, BLOCK // 2)
    return torch.cat((blocks & 0x0F, blocks >> 4), dim=2).reshape(out, half * 2)


def matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """[rows, in] float x, [out, in / 2] uint8 blocks, float32 scale [out], float32 bias [out] or None ->
    float32 [rows, out] = scale * ((codes - 8) @ x) + bias, with x rounded to int8 per block of 128."""
    lib, why = _library()
    if lib is None:
        raise RuntimeError(f"the INT4 CPU kernel is not available: {why}")
    rows, width = x.shape
    out = weight.shape[0]
    if width % BLOCK or weight.shape[1] * 2 != width or weight.dtype != torch.uint8 or scale.dtype != torch.float32 \
            or scale.shape != (out,) or (bias is not None and (bias.dtype != torch.float32 or bias.shape != (out,))):
        raise ValueError(f"INT4 kernel: bad shapes or dtypes: x {tuple(x.shape)}, weight {tuple(weight.shape)} "
                         f"{weight.dtype}, scale {tuple(scale.shape)} {scale.dtype}")
    x = x.to(torch.float32).contiguous()
    weight, scale = weight.contiguous(), scale.contiguous()
    bias = bias.contiguous() if bias is not None else None
    y = torch.empty(rows, out, dtype=torch.float32)
    work_q = torch.empty(rows * width, dtype=torch.int8)
    work_s = torch.empty(rows * (width // BLOCK) + rows, dtype=torch.float32)  # block scales, then row sums
    lib.q4_gemm(x.data_ptr(), rows, width, weight.data_ptr(), out, scale.data_ptr(),
                bias.data_ptr() if bias is not None else None, y.data_ptr(), work_q.data_ptr(),
                work_s.data_ptr(), work_s.data_ptr() + 4 * rows * (width // BLOCK), torch.get_num_threads())
    return y

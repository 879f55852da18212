"""The kernels built for other x86 instruction sets than this CPU's best (``-march=native``):
each build compiles, has the integer decode products (over int8 weights and over a GGUF file's
codes) and the int4 head, and where this CPU runs its instructions, computes the same bits as
the native build. So the paths that only other machines take (AVX2 alone, AVX-512 without
VNNI or without BF16) are exercised here too.

The builds are cached beside the native one (``native.directory()``), by source and target."""

from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from promptcache.engine.paged import codes, native
from promptcache.engine.paged.codes import Packed
from promptcache.engine.paged.models.int4 import pack_int4_native
from promptcache.engine.paged.models.int8 import quantize_weight
from promptcache.engine.paged.native_decode import vnni_weight
from tests.engine.paged.test_codes import READ, coded

# Each target and the CPU flags (/proc/cpuinfo's names) its code may use: the vector
# extensions GCC emits for it, and the scalar ones it may pick.
TARGETS = {
    "haswell": {"avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "abm"},
    "skylake-avx512": {"avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "abm", "avx512f",
                       "avx512cd", "avx512bw", "avx512dq", "avx512vl", "adx"},
    "icelake-server": {"avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "abm", "avx512f",
                       "avx512cd", "avx512bw", "avx512dq", "avx512vl", "adx", "avx512_vnni",
                       "avx512vbmi", "avx512_vbmi2", "avx512_bitalg", "avx512_vpopcntdq",
                       "avx512ifma", "gfni", "vaes", "vpclmulqdq"},
}  # fmt: skip

I64, PTR = ctypes.c_int64, ctypes.c_void_p

NATIVE = native.kernels()
COMPILER = native._compiler()
pytestmark = pytest.mark.skipif(
    NATIVE is None or COMPILER is None, reason="no C++ compiler or no x86 vectors here"
)


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def build_for(target: str) -> Path:
    """The library compiled for ``target`` instead of this CPU (``native.FLAGS`` otherwise)."""
    assert COMPILER is not None
    version = subprocess.run(
        [COMPILER, "--version"], capture_output=True, text=True, check=False
    ).stdout
    path = native.directory() / f"promptcache-native-{target}-{native.build_key(version)}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        flags = [f"-march={target}" if f == "-march=native" else f for f in native.FLAGS]
        tmp = path.with_suffix(".so.tmp")
        done = subprocess.run(
            [COMPILER, *flags, str(native.SOURCE), "-o", str(tmp)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        tmp.replace(path)
    return path


@pytest.mark.parametrize("target", TARGETS)
def test_a_build_for_another_instruction_set_computes_the_same_bits(target: str) -> None:
    path = build_for(target)
    missing = TARGETS[target] - cpu_flags()
    if missing:
        pytest.skip(f"this CPU cannot run the {target} build (no {', '.join(sorted(missing))})")
    other = native.Kernels(ctypes.CDLL(str(path)))
    assert NATIVE is not None
    library = other.library
    assert library.pc_vnni_products() == 1 and library.pc_int4_head() == 1
    assert library.pc_codes_products() == 1
    gen = torch.Generator().manual_seed(3)

    # The int4 head's scores and block maxima (1, 3 and 8 rows: each kernel shape).
    weight = torch.randn(4096, 640, generator=gen) * 0.02
    packed, scale_low = pack_int4_native(weight)
    for dtype in (torch.float32, torch.bfloat16):
        for rows in (1, 3, 8):
            x = torch.randn(rows, 640, generator=gen).to(dtype)
            maxima = [torch.empty(rows, 4096 // native.INT4_TOP_BLOCK) for _ in range(2)]
            want = NATIVE.int4_logits(x, packed, scale_low, block_max=maxima[0])
            got = other.int4_logits(x, packed, scale_low, block_max=maxima[1])
            assert want is not None and got is not None
            assert torch.equal(got, want) and torch.equal(maxima[1], maxima[0])

    # The decode rows' integer products (gemv_int8_vnni), both storage types, 1-8 rows.
    n, k = 96, 640
    for dtype in (torch.float32, torch.bfloat16):
        q, scales = quantize_weight(torch.randn(n, k, generator=gen), dtype)
        vnni = vnni_weight(q)  # held: the call reads it by address
        weights = [(PTR, vnni.data_ptr()), (PTR, scales.data_ptr())]
        assert_rows_alike("pc_gemv_int8_vnni", weights, dtype, n, k, gen, library)

    # The decode rows' products over a GGUF file's codes (gemv_codes): each form, 1-8 rows.
    for form in READ:
        c = coded(np.random.default_rng(7).standard_normal((n, k)).astype(np.float32) * 0.05, form)
        packed = Packed(codes.pack(c), c.bits, c.offset)
        for dtype in (torch.float32, torch.bfloat16):
            file = [(PTR, packed.data.data_ptr()), (I64, packed.bits), (I64, packed.offset)]
            assert_rows_alike("pc_gemv_codes", file, dtype, n, k, gen, library)


def assert_rows_alike(
    kind: str,
    weights: list[tuple[type[ctypes.c_int64] | type[ctypes.c_void_p], int]],
    dtype: torch.dtype,
    n: int,
    k: int,
    gen: torch.Generator,
    other: ctypes.CDLL,
) -> None:
    """``{kind}_{f32,bf16}(x, rows, k, *weights, bias, n, y, scratch)`` of 1, 5 and 8 rows (the
    weights' arguments as (ctypes type, value)): the same bits from the native library and from
    ``other``."""
    assert NATIVE is not None
    name = "f32" if dtype == torch.float32 else "bf16"
    x = torch.randn(8, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    for rows in (1, 5, 8):
        outs = []
        for lib in (NATIVE.library, other):
            fn = getattr(lib, f"{kind}_{name}")
            fn.restype = None
            types = [t for t, _ in weights]
            fn.argtypes = [PTR, I64, I64, *types, PTR, I64, PTR, PTR]
            y = torch.empty(rows, n, dtype=dtype)
            scratch = torch.empty(rows * k * 4 + 64, dtype=torch.uint8)
            part = x[:rows].contiguous()
            values = [v for _, v in weights]
            fn(
                part.data_ptr(),
                rows,
                k,
                *values,
                bias.data_ptr(),
                n,
                y.data_ptr(),
                scratch.data_ptr(),
            )
            outs.append(y)
        assert torch.equal(outs[1], outs[0])

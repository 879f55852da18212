"""The engine's CPU kernels (``native``): each computes what the PyTorch code it replaces
computes (the same roundings, float additions in another order), row by row independently of
the other rows, and the engine with them keeps hits exact."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from promptcache.engine.paged import native
from promptcache.engine.paged.attention import decode_attend, grouped
from promptcache.engine.paged.models.layers import (
    HeadNorm,
    OffsetRMSNorm,
    RMSNorm,
    apply_rope,
    residual_norm,
)
from promptcache.engine.paged.models.rope import Rotary

KERNELS = native.kernels()
pytestmark = pytest.mark.skipif(
    KERNELS is None, reason="no C++ compiler or no AVX-512 here: the kernels are not used"
)

DTYPES = (torch.float32, torch.bfloat16)


def close(dtype: torch.dtype) -> dict[str, float]:
    """Tolerances between two computations that differ in the order of float additions:
    float32 rounding error, or one bfloat16 rounding (2^-8 relative)."""
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 8e-3}


def kernels() -> native.Kernels:
    assert KERNELS is not None
    return KERNELS


def pool(slots: int, kv_heads: int, d: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(3)
    keys = torch.randn(slots, kv_heads, d, generator=gen).to(dtype)
    values = torch.randn(slots, kv_heads, d, generator=gen).to(dtype)
    return keys, values


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("heads", "kv_heads", "d"),
    # Vector paths (bfloat16: 16 / (heads per key head) keys a block) and loops.
    [(4, 1, 256), (9, 3, 64), (8, 8, 64), (8, 1, 32), (4, 2, 16), (12, 1, 32), (2, 2, 48)],
)
def test_decode_attention_matches_pytorch(
    dtype: torch.dtype, heads: int, kv_heads: int, d: int
) -> None:
    keys, values = pool(600, kv_heads, d, dtype)
    gen = torch.Generator().manual_seed(4)
    # Queries as the model passes them: a slice of the q/k/v slab, rows further apart.
    slab = torch.randn(3, heads + 2 * kv_heads, d, generator=gen).to(dtype)
    q = slab[:, :heads]
    width = 320
    slots = torch.randint(1, 600, (3, width), generator=gen)
    mask = torch.zeros(3, 1, 1, width)
    lengths = (width, 250, 7)
    for row, length in enumerate(lengths):
        mask[row, 0, 0, length:] = float("-inf")
        slots[row, length:] = 0
    for m in (mask, None):
        got = decode_attend(q, keys, values, slots, m, 0.125)
        with native.disabled():
            want = decode_attend(q, keys, values, slots, m, 0.125)
        assert got.shape == want.shape and got.dtype == dtype
        torch.testing.assert_close(got, want, **close(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_masked_key_is_never_read(dtype: torch.dtype) -> None:
    keys, values = pool(64, 1, 64, dtype)
    q = torch.randn(1, 2, 64).to(dtype)
    slots = torch.arange(40).unsqueeze(0)
    mask = torch.zeros(1, 1, 1, 40)
    mask[..., 30:] = float("-inf")
    want = kernels().decode_attention(q, keys, values, slots, mask, 0.1)
    keys[30:40] = float("nan")
    values[30:40] = float("nan")
    got = kernels().decode_attention(q, keys, values, slots, mask, 0.1)
    assert got is not None and want is not None
    assert torch.equal(got, want)


def test_tensors_the_kernels_do_not_read_fall_back() -> None:
    keys, values = pool(8, 1, 32, torch.float16)
    q = torch.randn(1, 2, 32).to(torch.float16)
    slots = torch.arange(4).unsqueeze(0)
    assert kernels().decode_attention(q, keys, values, slots, None, 0.1) is None
    x = torch.randn(3, 32)
    assert kernels().rms_norm(x, torch.ones(32, dtype=torch.float64), 1e-6, offset=True) is None
    assert kernels().rms_norm(x.t(), torch.ones(3), 1e-6, offset=True) is None


def norms(dtype: torch.dtype, n: int, seed: int) -> tuple[OffsetRMSNorm, RMSNorm]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=gen) * 0.5
    return OffsetRMSNorm(1.0 + w, 1e-6), RMSNorm(w.to(dtype), 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [64, 640, 40])
def test_norms_match_pytorch(dtype: torch.dtype, n: int) -> None:
    x = (torch.randn(5, n) * 3).to(dtype)
    for norm in norms(dtype, n, 5):
        got = norm(x)
        with native.disabled():
            want = norm(x)
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, **close(dtype))
        # The 3-D and strided views the layers pass.
        torch.testing.assert_close(norm(x.view(5, 1, n)), want.view(5, 1, n))


@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_norm_matches_pytorch(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(7, 64, generator=gen).to(dtype)
    a = (torch.randn(7, 64, generator=gen) * 4).to(dtype)
    offset, plain = norms(dtype, 64, 7)
    offset2, plain2 = norms(dtype, 64, 8)
    for pre, post in ((offset, offset2), (plain, plain2), (None, plain), (None, offset)):
        got = residual_norm(x, a, pre, post)
        with native.disabled():
            want = residual_norm(x, a, pre, post)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, **close(dtype))


def test_bfloat16_stores_round_as_pytorch_does() -> None:
    """The kernels' bfloat16 stores (the CPU's conversion where it has one) give PyTorch's bits
    for every float: subnormal sums (which that instruction would flush), NaN, infinities and
    ties included, in vectors with and without them."""
    gen = torch.Generator().manual_seed(12)
    x = (torch.randn(6, 64, generator=gen) * 100).to(torch.bfloat16)
    a = (torch.randn(6, 64, generator=gen) * 1e-3).to(torch.bfloat16)
    tiny = torch.tensor([1e-39, -3e-40, 5e-41, 1.1e-38, -1.17e-38], dtype=torch.bfloat16)
    x[1, 3:8], a[1, 3:8] = tiny, tiny  # subnormal sums in one vector of the row only
    x[2, :5] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0])
    x[3], a[3] = 1.0, 2.0**-8  # 1 + half an ulp: ties, to even
    x[4, ::2] = 3e38  # sums past the largest bfloat16 round to infinity
    a[4, ::2] = 3e38
    got = kernels().residual_norm(x, a, None, (torch.ones(64, dtype=torch.bfloat16), 1e-6), False)
    assert got is not None
    want = (x.float() + a.float()).to(torch.bfloat16)
    assert torch.equal(got[0].view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [True, False])
def test_head_norm_and_rope_match_pytorch(dtype: torch.dtype, offset: bool) -> None:
    heads, kv_heads, d, t = 4, 1, 64, 6
    gen = torch.Generator().manual_seed(9)
    slab = (torch.randn(t, heads + 2 * kv_heads, d, generator=gen) * 2).to(dtype)
    qk = slab[:, : heads + kv_heads]  # strided, as the model passes it
    w = torch.randn(d, generator=gen) * 0.3
    table = torch.cat([(1.0 + w if offset else w.to(dtype)).expand(heads + kv_heads, -1)])
    norm = HeadNorm(table.contiguous(), 1e-6, offset)
    rope = Rotary(torch.rand(d // 2), 1.0)(torch.arange(100, 100 + t), dtype)
    for args, r in (((norm.table, norm.eps), rope), ((norm.table, norm.eps), None), (None, rope)):
        got = kernels().qk_norm_rope(qk, args, offset, r)
        want = norm(qk) if args is not None else qk
        if r is not None:
            want = apply_rope(want, *r)
        assert got is not None
        torch.testing.assert_close(got, want, **close(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_each_row_is_computed_alone(dtype: torch.dtype) -> None:
    """What lets a cache hit reproduce a cold run: a row's result never depends on which other
    rows share its call (a prompt is cut into different chunks cold and on a hit)."""
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(9, 640, generator=gen).to(dtype)
    a = torch.randn(9, 640, generator=gen).to(dtype)
    offset, _ = norms(dtype, 640, 11)
    offset2, _ = norms(dtype, 640, 12)
    whole = residual_norm(x, a, offset, offset2)
    for lo, hi in ((0, 1), (3, 9), (4, 5)):
        part = residual_norm(x[lo:hi], a[lo:hi], offset, offset2)
        for p, w in zip(part, whole, strict=True):
            assert torch.equal(p, w[lo:hi])
    keys, values = pool(1200, 1, 256, dtype)
    q = torch.randn(4, 4, 256, generator=gen).to(dtype)
    # Past one chunk of keys (KEY_CHUNK, 256): one row alone is shared by both threads, in a
    # batch each row's chunks are; the cut is the same. (float32, and bfloat16 without
    # AVX512-BF16: one row alone shares its keys' scores and its columns out, decode_attention_
    # split; in a batch each row goes whole to a thread.)
    slots = torch.randint(1, 1200, (4, 700), generator=gen)
    mask = torch.zeros(4, 1, 1, 700)
    mask[1, ..., 650:] = float("-inf")
    for m in (None, mask):
        both = decode_attend(q, keys, values, slots, m, 0.0625)
        for row in range(4):
            one = slice(row, row + 1)
            m_row = None if m is None else m[one]
            alone = decode_attend(q[one], keys, values, slots[one], m_row, 0.0625)
            assert torch.equal(alone, both[one])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads", "d"), [(9, 3, 64), (4, 1, 256), (6, 2, 64)])
def test_key_heads_split_over_the_threads_attend_alike(
    dtype: torch.dtype, heads: int, kv_heads: int, d: int
) -> None:
    """One row of a model with a few key heads (SmolLM2's 3, not a multiple of the threads)
    shares each head's chunks out; in a batch, whole heads go to a thread. Same bits both ways,
    with the scores of an additive mask that is not only 0 and -inf (a bias) too."""
    gen = torch.Generator().manual_seed(12)
    keys, values = pool(2000, kv_heads, d, dtype)
    q = torch.randn(5, heads, d, generator=gen).to(dtype)
    slots = torch.randint(1, 2000, (5, 900), generator=gen)
    zero = torch.zeros(5, 1, 1, 900)
    zero[2, ..., 700:] = float("-inf")
    bias = torch.randn(5, 1, 1, 900, generator=gen)
    bias[3, ..., :100] = float("-inf")
    for m in (None, zero, bias):
        both = decode_attend(q, keys, values, slots, m, 0.125)
        with native.disabled():
            want = decode_attend(q, keys, values, slots, m, 0.125)
        torch.testing.assert_close(both, want, **close(dtype))
        for row in range(5):
            one = slice(row, row + 1)
            alone = decode_attend(
                q[one], keys, values, slots[one], None if m is None else m[one], 0.125
            )
            assert torch.equal(alone, both[one])


def chunk_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    slots: torch.Tensor,
    positions: tuple[int, int],
    window: int | None,
) -> torch.Tensor:
    """A prefill chunk's attention as the PyTorch path computes it (``grouped`` over the
    gathered keys with the chunk's causal, windowed mask), or the kernel's when it runs."""
    n, heads, d = q.shape
    out = torch.empty(n, heads, d, dtype=q.dtype)
    if kernels().prefill_attention(q, keys, values, slots, positions, window, 0.0625, out):
        return out
    k0, q0 = positions
    q_pos = torch.arange(q0, q0 + n).unsqueeze(1)
    k_pos = torch.arange(k0, k0 + slots.shape[0]).unsqueeze(0)
    seen = k_pos <= q_pos
    if window is not None:
        seen &= k_pos > q_pos - window
    mask = torch.zeros(seen.shape).masked_fill(~seen, float("-inf"))
    kk = keys[slots].transpose(0, 1).unsqueeze(0).to(q.dtype)
    vv = values[slots].transpose(0, 1).unsqueeze(0).to(q.dtype)
    return grouped(q.transpose(0, 1).unsqueeze(0), kk, vv, mask, 0.0625)[0].transpose(0, 1)


PREFILL_CASES = [
    # heads, kv_heads, d, queries, first query, window
    (4, 1, 256, 64, 900, 512),  # Gemma 3 270M's hit: a suffix over a window
    (4, 1, 256, 70, 900, None),  # and over the whole context
    (4, 1, 256, 1, 1100, None),  # one query
    (9, 3, 64, 37, 100, None),  # SmolLM2's heads
    (8, 2, 128, 300, 7, None),  # many units, some with fewer keys
    (4, 2, 16, 70, 0, 16),  # the tiny test models: a window shorter than the chunk
    (4, 2, 48, 33, 40, None),  # a last block of 16 columns
    (2, 2, 32, 5, 3, 2),
    (20, 1, 32, 9, 30, 12),  # more query heads a key head than one vector's 16 lanes
]

# Float32 wherever the kernels run; bfloat16 with AVX512-BF16 (elsewhere PyTorch's path).
PREFILL_DTYPES = [
    torch.float32,
    pytest.param(
        torch.bfloat16,
        marks=pytest.mark.skipif(
            KERNELS is None or KERNELS.prefill is None,
            reason="no AVX512-BF16 here: PyTorch's path",
        ),
    ),
]
each_chunk = pytest.mark.parametrize(("heads", "kv_heads", "d", "n", "q0", "window"), PREFILL_CASES)


def chunk(
    heads: int,
    kv_heads: int,
    d: int,
    n: int,
    q0: int,
    window: int | None,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
    keys, values = pool(1300, kv_heads, d, dtype)
    gen = torch.Generator().manual_seed(seed)
    k0 = 0 if window is None else max(0, q0 - window + 1)
    slots = torch.randperm(1300, generator=gen)[: q0 + n - k0]  # scattered, as a pool may be
    # Queries as the model passes them: a slice of the q/k/v slab.
    q = torch.randn(n, heads + 2 * kv_heads, d, generator=gen).to(dtype)[:, :heads]
    return q, keys, values, slots, (k0, q0)


@pytest.mark.parametrize("dtype", PREFILL_DTYPES)
@each_chunk
def test_prefill_attention_matches_pytorch(
    heads: int, kv_heads: int, d: int, n: int, q0: int, window: int | None, dtype: torch.dtype
) -> None:
    q, keys, values, slots, positions = chunk(heads, kv_heads, d, n, q0, window, dtype)
    got = chunk_attention(q, keys, values, slots, positions, window)
    with native.disabled():
        want = chunk_attention(q, keys, values, slots, positions, window)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, **close(dtype))


@pytest.mark.parametrize("dtype", PREFILL_DTYPES)
@each_chunk
def test_a_query_attends_alike_in_any_chunk(
    heads: int, kv_heads: int, d: int, n: int, q0: int, window: int | None, dtype: torch.dtype
) -> None:
    """A cold prompt and a hit cut the same queries into different chunks (and the kernel its
    chunks into different units): each query's result is the same bits."""
    q, keys, values, slots, (k0, _) = chunk(heads, kv_heads, d, n, q0, window, dtype)
    whole = chunk_attention(q, keys, values, slots, (k0, q0), window)
    for cut in {1, n // 3, n - 1} - {0, n}:
        first = chunk_attention(q[:cut], keys, values, slots[: q0 + cut - k0], (k0, q0), window)
        lo = k0 if window is None else max(k0, q0 + cut - window + 1)
        rest = chunk_attention(q[cut:], keys, values, slots[lo - k0 :], (lo, q0 + cut), window)
        assert torch.equal(torch.cat([first, rest]), whole)


needs_kv16 = pytest.mark.skipif(
    KERNELS is None or not KERNELS.kv16, reason="no F16C here: PyTorch's path for float16 pools"
)


@needs_kv16
@pytest.mark.parametrize(("heads", "kv_heads", "d"), [(4, 1, 256), (9, 3, 64), (2, 2, 48)])
def test_a_float16_pool_attends_as_its_keys_converted(heads: int, kv_heads: int, d: int) -> None:
    """A float16 pool under a float32 model (``--kv-dtype float16``): decode rows and prompt
    chunks attend as the float32 kernels do over the same keys and values converted (the same
    bits: the conversion is exact), and as PyTorch's path does."""
    keys, values = pool(1300, kv_heads, d, torch.float16)
    wide = keys.float(), values.float()
    gen = torch.Generator().manual_seed(9)
    q = torch.randn(3, heads, d, generator=gen)
    slots = torch.randint(1, 1300, (3, 700), generator=gen)
    mask = torch.zeros(3, 1, 1, 700)
    mask[1, ..., 500:] = float("-inf")
    for m in (mask, None):
        got = decode_attend(q, keys, values, slots, m, 0.125)
        assert got.dtype == torch.float32
        assert torch.equal(got, decode_attend(q, *wide, slots, m, 0.125))
        with native.disabled():
            torch.testing.assert_close(got, decode_attend(q, keys, values, slots, m, 0.125))
    for window in (None, 100):
        q, _, _, slots, positions = chunk(heads, kv_heads, d, 64, 900, window, torch.float32)
        got = chunk_attention(q, keys, values, slots, positions, window)
        assert torch.equal(got, chunk_attention(q, *wide, slots, positions, window))
        with native.disabled():
            want = chunk_attention(q, keys, values, slots, positions, window)
        torch.testing.assert_close(got, want, **close(torch.float32))


@pytest.mark.skipif(
    KERNELS is None or KERNELS.prefill is None, reason="no AVX512-BF16 here: PyTorch's path"
)
def test_a_subnormal_probability_weighs_what_an_unseen_key_weighs() -> None:
    """The bfloat16 kernel rounds probabilities by the CPU's conversion, which makes a
    subnormal 0 where PyTorch keeps it: it multiplies them by vdpbf16ps, which reads a
    subnormal as 0 all the same. So a key whose probability is a subnormal adds exactly what
    a key outside the window adds: the same bits."""
    heads, d = 4, 64
    gen = torch.Generator().manual_seed(9)
    keys, values = torch.zeros(3, 1, d), torch.randn(3, 1, d, generator=gen)
    # Scores -81 (bfloat16), 6.25, 6.25: the first key's exponential a normal number (the
    # kernels' exp is 0 below -88), its probability half of it, a subnormal.
    keys[:, 0, 0] = torch.tensor([-12.96, 1.0, 1.0])
    # Columns where the first key's value alone is not 0: a product the subnormal kept would
    # show there (~1e-37, a normal number).
    values[0, 0, :8], values[1:, 0, :8] = 100.0, 0.0
    keys, values = keys.to(torch.bfloat16), values.to(torch.bfloat16)
    q = torch.zeros(1, heads, d, dtype=torch.bfloat16)
    q[..., 0] = 100.0
    scores = (q[0, 0].float() @ keys[:, 0].float().T).to(torch.bfloat16).float() * 0.0625
    first = torch.softmax(scores, dim=-1)[0].to(torch.bfloat16)
    assert 0 < first.abs() < torch.finfo(torch.float32).tiny  # a bfloat16 subnormal
    out = {}
    for window, k0 in ((3, 0), (2, 1)):  # the query at position 2 sees keys 0..2, then 1..2
        out[window] = torch.empty(1, heads, d, dtype=torch.bfloat16)
        slots = torch.arange(k0, 3)
        assert kernels().prefill_attention(
            q, keys, values, slots, (k0, 2), window, 0.0625, out[window]
        )
    assert torch.equal(out[3], out[2])
    assert not out[3][..., :8].any()


def test_prefill_attention_declines_what_it_does_not_read() -> None:
    keys, values = pool(64, 1, 64, torch.float32)
    q = torch.randn(4, 2, 64)
    out = torch.full((4, 2, 64), 7.0)
    slots = torch.arange(8)
    half = [t.to(torch.float16) for t in (q, keys, values)]
    assert not kernels().prefill_attention(*half, slots, (0, 4), None, 0.1, out.half())
    # Keys of another dtype than the queries (but float16 under float32: a float16 pool).
    bf16 = [t.to(torch.bfloat16) for t in (keys, values)]
    assert not kernels().prefill_attention(q, bf16[0], bf16[1], slots, (0, 4), None, 0.1, out)
    bf = [t.to(torch.float32) for t in (q, keys, values, out)]
    # Keys that do not end at the chunk's last query, and a head size not a multiple of 16.
    assert not kernels().prefill_attention(bf[0], bf[1], bf[2], slots, (0, 3), None, 0.1, bf[3])
    odd = [t[..., :40].contiguous() for t in bf]
    assert not kernels().prefill_attention(odd[0], odd[1], odd[2], slots, (0, 4), None, 0.1, odd[3])
    assert torch.equal(out, torch.full((4, 2, 64), 7.0))


def test_the_build_is_cached_by_source_and_machine(tmp_path: Path) -> None:
    compiler = native._compiler()
    assert compiler is not None
    first = native.build(compiler, tmp_path)
    stamp = first.stat().st_mtime_ns
    assert native.build(compiler, tmp_path) == first
    assert first.stat().st_mtime_ns == stamp  # loaded, not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary left behind


def test_an_edited_kernel_header_is_built_anew(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    headers = sorted(native.HEADERS.glob("*.h"))
    assert {h.name for h in headers} >= {"common.h", "steps.h", "head.h"}
    before = native.build_key("g++ 12")
    copies = tmp_path / "kernels"
    copies.mkdir()
    for header in headers:
        (copies / header.name).write_text(header.read_text())
    monkeypatch.setattr(native, "HEADERS", copies)
    assert native.build_key("g++ 12") == before  # the same texts: the same library
    (copies / "head.h").write_text((copies / "head.h").read_text() + "\n// edited\n")
    assert native.build_key("g++ 12") != before
    assert native.build_key("g++ 13") != native.build_key("g++ 12")


def test_a_failing_compiler_is_reported(tmp_path: Path) -> None:
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'broken compiler' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(RuntimeError, match="broken compiler"):
        native.build(str(fake), tmp_path / "out")


def test_they_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMPTCACHE_NATIVE", "off")
    assert native._load() is None
    monkeypatch.delenv("PROMPTCACHE_NATIVE")
    assert native._load() is not None
    with native.disabled():
        assert native.kernels() is None
    assert native.kernels() is KERNELS


def test_no_kernel_runs_inside_a_compiled_graph() -> None:
    """Dynamo cannot trace a ctypes call: the compiled step keeps PyTorch's operations."""
    norm, _ = norms(torch.float32, 64, 13)
    compiled = torch.compile(norm, fullgraph=True, dynamic=False, backend="eager")
    x = torch.randn(2, 64)
    torch.testing.assert_close(compiled(x), norm(x))


def test_the_default_directory_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMPTCACHE_NATIVE_DIR", os.fspath(Path("somewhere")))
    assert native.directory() == Path("somewhere")
    monkeypatch.delenv("PROMPTCACHE_NATIVE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", "cachehome")
    monkeypatch.setattr(native, "_directory", None)
    assert native.directory() == Path("cachehome") / "promptcache" / "native"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_an_engine_with_the_kernels_keeps_hits_exact(
    kind: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    from promptcache.engine.hf.testing import build_tiny_engine
    from tests.engine.paged.test_int8 import assert_hits_exact

    calls: dict[str, int] = {}
    names = ["decode_attention", "rms_norm", "residual_norm", "qk_norm_rope"]
    if dtype == torch.float32 or kernels().prefill is not None:
        names.append("prefill_attention")
    for name in names:
        real = getattr(native.Kernels, name)

        def counted(
            self: native.Kernels, *args: object, _real: Any = real, _name: str = name, **kw: Any
        ) -> object:
            out = _real(self, *args, **kw)
            calls[_name] = calls.get(_name, 0) + (out is not None and out is not False)
            return out

        monkeypatch.setattr(native.Kernels, name, counted)
    # Without int8 weights: decode steps run through the PyTorch model and these kernels
    # (with them, narrow ones run whole in ``NativeDecode``: test_native_decode.py).
    engine = build_tiny_engine(kind, dtype=dtype)
    assert engine.native_decode is None
    engine.native_prefill = None  # prompt chunks too (with it: test_native_prefill.py)
    assert_hits_exact(engine)
    # Every kernel ran (and none was turned down) while the engine computed.
    assert set(calls) == set(names)
    assert all(calls.values())


def test_rms_norm_reference_formula() -> None:
    """The offset norm in plain formulas (transformers' Gemma3RMSNorm), as an anchor that does
    not go through either implementation's code."""
    x = torch.randn(3, 64)
    norm, _ = norms(torch.float32, 64, 14)
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.scale
    torch.testing.assert_close(norm(x), want)
    torch.testing.assert_close(F.rms_norm(x, (64,), norm.scale, 1e-6), want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["gelu_pytorch_tanh", "silu"])
def test_the_gated_activation_matches_pytorch(dtype: torch.dtype, name: str) -> None:
    from promptcache.engine.paged.models.layers import ACTIVATIONS, kernel_act

    act = ACTIVATIONS[name]
    code = kernel_act(act)
    assert code is not None
    gen = torch.Generator().manual_seed(15)
    for rows, width in ((1, 2048), (67, 96), (3, 40)):  # vector lanes, many rows, loops
        gate_up = (torch.randn(rows, 2 * width, generator=gen) * 3).to(dtype)
        got = kernels().gated_act(gate_up, code)
        gate, up = gate_up.chunk(2, dim=-1)
        assert got is not None
        torch.testing.assert_close(got, act(gate) * up, **close(dtype))
    assert kernel_act(torch.nn.functional.gelu) is None  # erf gelu: PyTorch's


@pytest.mark.parametrize("dtype", DTYPES)
def test_prompt_attention_probabilities_match_pytorch(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(16)
    heads, lq, width = 4, 9, 70
    scores = (torch.randn(1, heads, lq, width, generator=gen) * 4).to(dtype)
    allowed = torch.ones(lq, width, dtype=torch.bool).tril(width - lq)
    mask = torch.zeros(lq, width).masked_fill(~allowed, float("-inf"))
    for m in (mask, None, mask[None]):
        got = kernels().scale_mask_softmax(scores, m, 0.3)
        want = scores.float() * 0.3
        if m is not None:
            want = want + m
        assert got is not None
        torch.testing.assert_close(got, torch.softmax(want, -1).to(dtype), **close(dtype))
    # A mask per batch row is not one it applies.
    assert kernels().scale_mask_softmax(scores, torch.zeros(2, 1, 1, width), 0.3) is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_probabilities_do_not_depend_on_the_masked_width(dtype: torch.dtype) -> None:
    """A prompt row is computed in a chunk whose key width depends on where the chunk ends
    (cold and on a hit, chunks end in different places): keys beyond the row are masked, and
    its probabilities must come out bit for bit the same whatever their number."""
    gen = torch.Generator().manual_seed(17)
    scores = (torch.randn(1, 2, 1, 101, generator=gen) * 5).to(dtype)
    seen = 37
    got = []
    for width in (37, 40, 48, 64, 101):
        mask = torch.zeros(1, width)
        mask[:, seen:] = float("-inf")
        probs = kernels().scale_mask_softmax(scores[..., :width].contiguous(), mask, 0.2)
        assert probs is not None
        assert not probs[..., seen:].any()
        got.append(probs[..., :seen])
    for other in got[1:]:
        assert torch.equal(other, got[0])


def test_the_kernels_run_on_pytorchs_openmp_runtime() -> None:
    """One OpenMP runtime in the process: the library's libgomp is the one PyTorch loaded."""
    runtimes = native._openmp_runtimes()
    if not runtimes:
        pytest.skip("no /proc/self/maps here, or PyTorch without GNU OpenMP")
    assert len(runtimes) == 1, runtimes


def test_argmax_is_pytorchs() -> None:
    gen = torch.Generator().manual_seed(18)
    logits = torch.randn(5, 262_144 + 7, generator=gen)
    logits[1, 100] = logits[1, 90_000] = 99.0  # a tie: the first index, as torch.argmax
    logits[2] = float("-inf")
    logits[2, -1] = 0.0  # the row's maximum in the vector loop's masked tail
    assert kernels().argmax(logits) == torch.argmax(logits, dim=-1).tolist()
    assert (
        kernels().argmax(logits[:, :33].contiguous()) == torch.argmax(logits[:, :33], -1).tolist()
    )
    logits[3, 5] = float("nan")  # PyTorch ranks NaN highest: left to it
    assert kernels().argmax(logits) is None
    assert kernels().argmax(logits.double()) is None


def test_argmax_from_block_maxima_is_pytorchs() -> None:
    """Rows whose block maxima are known except in the blocks of a few rewritten columns: the
    argmax reads the maxima and those blocks, and finds torch.argmax's index, the first on
    ties, whether the winner was rewritten or not."""
    gen = torch.Generator().manual_seed(19)
    block = 128
    logits = torch.randn(6, 64 * block, generator=gen)
    touched = torch.randint(0, 64 * block, (6, 5), generator=gen)
    maxima = logits.view(6, 64, block).amax(-1)
    # Written after the maxima were taken: a new winner (row 0), a tie with an untouched
    # column in an earlier block (row 1) and in a later one (row 2), and a lowered former
    # winner (row 3: its block's stale maximum must not count).
    logits.scatter_(1, touched, torch.randn(6, 5, generator=gen))
    logits[0, touched[0, 0]] = 50.0
    logits[1, 7] = 40.0
    maxima[1, 0] = 40.0
    logits[1, touched[1, 1]] = 40.0
    logits[2, 64 * block - 1] = 30.0
    maxima[2, -1] = 30.0
    logits[2, touched[2, 2]] = 30.0
    top = int(logits[3].argmax())
    touched[3, 0] = top
    logits[3, top] = -50.0
    logits[4] = float("-inf")  # every value -inf: the whole row searched, index 0
    maxima[4] = float("-inf")
    found = kernels().argmax_blocks(logits, maxima, touched)
    assert found == torch.argmax(logits, dim=-1).tolist()
    logits[5, touched[5, 0]] = float("nan")  # left to PyTorch, which ranks NaN highest
    assert kernels().argmax_blocks(logits, maxima, touched)[5] == int(touched[5, 0])


def test_sampling_draws_what_pytorch_draws() -> None:
    """The engine's sampler against ``sampling.draw`` of PyTorch's softmax at the same uniform
    draws: the same token, with masked (-inf) logits never drawn (nor any below e^-88 of the
    most likely, where its exp is 0), a width that is no multiple of 16, draws at 0 and just
    under 1, and a NaN row left to PyTorch."""
    gen = torch.Generator().manual_seed(20)
    logits = torch.randn(4, 50_001, generator=gen) * 4
    logits[1, ::3] = float("-inf")
    logits[2, :-5] = float("-inf")  # only the last five can be drawn
    temperatures = [1.0, 0.7, 1.3, 0.2]
    for uniforms in ([0.0, 0.0, 0.0, 0.0], [1 - 2**-40] * 4, *torch.rand(40, 4, generator=gen)):
        draws = [float(u) for u in uniforms]
        found = kernels().sample(logits, temperatures, draws)
        assert found is not None
        for r in range(4):
            probs = torch.softmax(logits[r] / temperatures[r], -1).double()
            # Below e^-88 of the most likely token the kernel's exp is 0: never drawn.
            probs[logits[r] / temperatures[r] - logits[r].max() / temperatures[r] < -88] = 0.0
            cumulative = probs.cumsum(0)
            expected = torch.searchsorted(cumulative, draws[r] * cumulative[-1], right=True)
            expected = min(int(expected), int(torch.searchsorted(cumulative, cumulative[-1])))
            assert found[r] == expected
            assert torch.isfinite(logits[r, found[r]])
    logits[3, 7] = float("nan")
    assert kernels().sample(logits, temperatures, [0.5] * 4) is None
    assert kernels().sample(logits.double(), temperatures, [0.5] * 4) is None


@pytest.mark.parametrize("width", [50_001, 262_144])
def test_top_p_and_top_k_draw_what_pytorch_draws(width: int) -> None:
    """Nucleus and top-k sampling in the kernel against ``sampling``'s PyTorch cut
    (``apply_top_k``, then ``apply_top_p`` with its sort) and ``draw``, at the same uniform
    draws: the same token, for narrow and wide nuclei, top-p 0 (the most likely alone), top-k
    alone and both together, on a flat row and a peaked one."""
    from promptcache.engine.sampling import apply_top_k, apply_top_p

    gen = torch.Generator().manual_seed(22)
    logits = torch.randn(6, width, generator=gen) * 3
    logits[1] = torch.randn(width, generator=gen) * 0.2  # flat: a wide nucleus
    logits[2, 17] = 25.0  # peaked: a nucleus of one or two
    logits[3, ::5] = float("-inf")
    rows = [(1.0, 0.9, None), (1.0, 0.95, None), (0.8, 0.5, None), (1.3, 0.0, None),
            (0.7, None, 40), (1.0, 0.9, 64)]  # fmt: skip
    temperatures = [t for t, _, _ in rows]
    top_ps = [1.0 if p is None else p for _, p, _ in rows]
    floors = [
        float(torch.topk(logits[r], k).values[-1]) if k else float("-inf")
        for r, (_, _, k) in enumerate(rows)
    ]
    for uniforms in ([0.0] * 6, [1 - 2**-40] * 6, *torch.rand(10, 6, generator=gen)):
        draws = [float(u) for u in uniforms]
        found = kernels().sample(logits, temperatures, draws, top_ps, floors)
        assert found is not None
        for r, (t, p, k) in enumerate(rows):
            scaled = logits[r] / t
            if k:
                scaled = apply_top_k(scaled, k)
            if p is not None:
                scaled = apply_top_p(scaled, p)
            cumulative = torch.softmax(scaled, -1).cumsum(0, dtype=torch.float64)
            expected = torch.searchsorted(cumulative, draws[r] * cumulative[-1], right=True)
            expected = min(int(expected), int(torch.searchsorted(cumulative, cumulative[-1])))
            assert found[r] == expected, (r, draws[r])
            assert torch.isfinite(scaled[found[r]])


def test_a_row_alone_draws_as_in_a_batch() -> None:
    """One row (a single stream's) shares its blocks out among the threads, rows of a batch go
    whole to a thread: the same maximum, exponentials and sums, so the same token at every
    draw; a NaN or an infinity anywhere in the row is found either way."""
    gen = torch.Generator().manual_seed(21)
    logits = torch.randn(4, 262_147, generator=gen) * 4
    logits[1, ::3] = float("-inf")
    logits[2, :-40_000] = float("-inf")  # only the last blocks (another thread's) are drawn
    logits[3, 200_000] = 30.0  # the maximum far into the row
    temperatures = [1.0, 0.7, 1.3, 0.2]
    for uniforms in ([0.0] * 4, [1 - 2**-40] * 4, *torch.rand(12, 4, generator=gen)):
        draws = [float(u) for u in uniforms]
        batch = kernels().sample(logits, temperatures, draws)
        alone = [
            kernels().sample(logits[r : r + 1], temperatures[r : r + 1], draws[r : r + 1])
            for r in range(4)
        ]
        assert batch is not None and alone == [[t] for t in batch]
    for bad in (float("nan"), float("inf")):
        row = logits[:1].clone()
        row[0, 250_000] = bad
        assert kernels().sample(row, [1.0], [0.5]) is None

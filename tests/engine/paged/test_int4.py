"""The int4 head with exact rescoring: each kernel (PyTorch's, the engine's own) multiplies by
its dequantized weight, the candidates carry the dense logits, the winner is the dense winner,
and a row scores the same alone as in a batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from promptcache.engine.paged import native
from promptcache.engine.paged.models import int4
from promptcache.engine.paged.models.int4 import GROUP_SIZE, RescoredHead, pack_int4
from promptcache.engine.paged.models.int8 import DecodeInt8Linear, add_decode_int8
from promptcache.engine.paged.models.layers import Linear


def native_int4() -> bool:
    kernels = native.kernels()
    return kernels is not None and kernels.int4_head


needs_native = pytest.mark.skipif(
    not native_int4(),
    reason="the engine's int4 kernel needs AVX512-VNNI or AVX2, and a C++ compiler",
)


def head(vocab: int = 8192, hidden: int = 256, seed: int = 0) -> Linear:
    gen = torch.Generator().manual_seed(seed)
    # Embedding-like rows: a shared direction plus noise, so many logits are close together.
    common = torch.randn(hidden, generator=gen)
    weight = 0.05 * (torch.randn(vocab, hidden, generator=gen) + 0.5 * common)
    return Linear(weight.to(torch.bfloat16))


def test_the_kernel_multiplies_by_the_dequantized_weight() -> None:
    weight = head(vocab=520, hidden=128).weight  # 520 rows: padded to a multiple of 16
    packed, sz = pack_int4(weight)
    # The kernel's own weight: its product with the identity, exact in bfloat16 inputs.
    deq = (
        torch._weight_int4pack_mm_for_cpu(
            torch.eye(128, dtype=torch.bfloat16), packed, GROUP_SIZE, sz
        )
        .float()
        .t()[:520]
    )
    step = sz[..., 0].transpose(0, 1).float().repeat_interleave(GROUP_SIZE, 1)[:520]
    # Within half a step of the weight, plus the bfloat16 rounding of scale and zero.
    slack = 0.5 * step + 2**-8 * (weight.float().abs() + step * 8)
    assert ((deq - weight.float()).abs() <= slack).all()
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    out = torch._weight_int4pack_mm_for_cpu(x, packed, GROUP_SIZE, sz).float()[:, :520]
    expected = x.float() @ deq.t()
    assert (out - expected).abs().max() <= 2**-7 * expected.abs().max()


def unpack_native(packed: torch.Tensor, scale_low: torch.Tensor) -> torch.Tensor:
    """The weight ``int4_logits`` multiplies by, ``[N, K]`` float32, from its layout."""
    blocks, groups = packed.shape[:2]
    lo = (packed & 15).view(blocks, groups, 8, 16, 4)
    hi = (packed >> 4).view(blocks, groups, 8, 16, 4)
    q = torch.stack([lo, hi], dim=3)  # [block, group, step, half, row, input]
    q = q.permute(0, 4, 1, 2, 3, 5).reshape(blocks * 16, groups * 64).float()

    def per_input(i: int) -> torch.Tensor:
        return scale_low[:, :, i].float().permute(0, 2, 1).reshape(blocks * 16, groups)

    return q * per_input(0).repeat_interleave(64, 1) + per_input(1).repeat_interleave(64, 1)


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_native_kernel_multiplies_by_its_dequantized_weight(dtype: torch.dtype) -> None:
    """``int4_logits`` against its own weight, read back from the layout: within what rounding
    the activations to 8 bits per group of 64 moves; a row scores the same in any batch."""
    weight = head(vocab=520, hidden=128).weight  # 520 rows: padded to a multiple of 16
    packed, scale_low = int4.pack_int4_native(weight)
    assert packed.shape == (33, 2, 8, 64) and scale_low.shape == (33, 2, 2, 16)
    deq = unpack_native(packed, scale_low)
    step = scale_low[:, :, 0].float().permute(0, 2, 1).reshape(-1, 2).repeat_interleave(64, 1)
    assert ((deq[:520] - weight.float()).abs() <= 0.51 * step[:520] + 1e-6).all()
    assert (deq[520:].abs() <= 1e-6).all()  # the padding rows are zeros
    kernels = native.kernels()
    assert kernels is not None
    x = torch.randn(11, 128, generator=torch.Generator().manual_seed(3)).to(dtype)
    out = kernels.int4_logits(x, packed, scale_low)
    assert out is not None and out.shape == (11, 528) and out.dtype == torch.float32
    # Each activation moves by at most half its group's step (largest |x| / 127).
    x_step = x.float().view(11, 2, 64).abs().amax(-1).repeat_interleave(64, 1) / 127
    bound = (0.5 * x_step) @ deq.abs().t() + 1e-3
    assert ((out - x.float() @ deq.t()).abs() <= bound).all()
    alone = torch.cat([kernels.int4_logits(x[i : i + 1], packed, scale_low) for i in range(11)])
    assert torch.equal(alone, out)


COPIES = ["int8", "int4", "native"]
"""The head's cheaper copies: PyTorch's quantized engine's int8, PyTorch's int4, the engine's
own int4 kernel."""


def rescored_head(dense: Linear, copy: str) -> RescoredHead:
    """``RescoredHead`` reading ``copy`` (skipped where this machine lacks it)."""
    if copy == "native" and not native_int4():
        pytest.skip("no native int4 kernel here")
    if copy == "int8" and not int4.quantized_engine():
        pytest.skip("no quantized engine in this PyTorch")
    head = RescoredHead(dense, native_kernel=copy == "native", int8=copy == "int8")
    assert head.ready.wait(60)
    assert (head.native is not None, head.int8 is not None, head.int4 is not None) == (
        copy == "native",
        copy == "int8",
        copy == "int4",
    )
    return head


@pytest.mark.parametrize("copy", COPIES)
def test_candidates_carry_the_dense_logits_and_the_winner_is_the_dense_winner(copy: str) -> None:
    dense = head()
    rescored = rescored_head(dense, copy)
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    ref = F.linear(x, dense.weight).float()
    out = rescored(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert torch.equal(out.argmax(-1), ref.argmax(-1))
    top = ref.argmax(-1, keepdim=True)
    # The winner's logit is the dense one (bf16 products, summed in another order).
    assert (out.gather(1, top) - ref.gather(1, top)).abs().max() <= 0.02 * ref.abs().max()
    # Elsewhere int4 is close, not exact.
    assert (out - ref).abs().mean() <= 0.15 * ref.abs().mean()


@needs_native
def test_the_native_head_scores_a_row_the_same_alone_and_in_a_batch() -> None:
    """One kernel for every row count: a row's every logit is the same alone as in a batch,
    and no int8 copy is made."""
    rescored = RescoredHead(head(), int8_in_background=True)
    assert rescored.native is not None and rescored.ready.is_set() and rescored.int8 is None
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    batch = rescored(x)
    for i in range(8):
        assert torch.equal(rescored(x[i : i + 1])[0], batch[i])


@needs_native
def test_the_native_head_scores_exactly_with_the_kernels_off() -> None:
    dense = head(seed=8)
    rescored = RescoredHead(dense)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    with native.disabled():
        out = rescored(x)
    assert torch.equal(out, F.linear(x, dense.weight).float())


@pytest.mark.parametrize("copy", COPIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_row_scores_the_same_alone_and_in_a_batch(copy: str, dtype: torch.dtype) -> None:
    """One copy for every row count, each row computed on its own: a row's every logit is the
    same alone as beside others, rows of very different magnitudes included (PyTorch's int8
    kernel rounds a batch's activations over one range, ``int8_logits``)."""
    dense = head()
    rescored = rescored_head(Linear(dense.weight.to(dtype)), copy)
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(2))
    x[3] *= 50.0
    x[5] *= 0.01
    x = x.to(dtype)
    batch = rescored(x)
    for i in range(8):
        assert torch.equal(rescored(x[i : i + 1])[0], batch[i])


def test_int8_logits_round_each_row_over_its_own_range() -> None:
    """Each row's inputs are rounded to 8 bits over that row's own largest magnitude: a row's
    error is a fraction of its own scale, however large its neighbours, and a batch's scores
    are its rows' scores."""
    if not int4.quantized_engine():
        pytest.skip("no quantized engine in this PyTorch")
    weight = head(vocab=1024).weight
    packed = int4.pack_int8_fbgemm(weight)
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(3))
    x[0] *= 1000.0
    x[2] = 0.0  # a row of zeros scores zero, without dividing by zero
    out = int4.int8_logits(x, packed)
    assert out.shape == (4, 1024) and out.dtype == torch.float32
    exact = x @ weight.float().t()
    for row in (0, 1, 3):
        assert (out[row] - exact[row]).abs().max() <= 0.03 * exact[row].abs().max()
    assert torch.equal(out[2], torch.zeros(1024))
    assert torch.equal(torch.cat([int4.int8_logits(x[i : i + 1], packed) for i in range(4)]), out)


def test_add_decode_int8_gives_the_head_int4_rescoring() -> None:
    from promptcache.engine.paged.models import from_hf
    from tests.engine.paged.tiny_models import build

    model = from_hf(build("gemma3_scaled"), torch.bfloat16)
    add_decode_int8(model)
    hidden = model.shape.hidden_size
    expected = RescoredHead if hidden % GROUP_SIZE == 0 else DecodeInt8Linear
    assert isinstance(model.lm_head, expected)
    assert isinstance(model.layers[0].mlp.down, DecodeInt8Linear)


def test_a_head_packed_in_the_background_scores_with_its_copy_from_the_first_row() -> None:
    """The int8 copy is packed on a thread of its own; a row scored before it is ready waits
    for it rather than taking another copy: its logits never depend on when it came."""
    if not int4.quantized_engine():
        pytest.skip("no quantized engine in this PyTorch")
    dense = head(seed=4)
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    rescored = RescoredHead(dense, int8_in_background=True, native_kernel=False)
    first = rescored(x)  # at once: most likely before the copy is packed
    assert rescored.ready.is_set() and rescored.int8 is not None and rescored.int4 is None
    assert torch.equal(rescored(x), first)
    assert torch.equal(first.argmax(-1), F.linear(x, dense.weight).float().argmax(-1))


@pytest.mark.parametrize("copy", COPIES)
def test_a_head_with_a_bias_ranks_and_scores_with_it(copy: str) -> None:
    dense = head(vocab=4096, seed=6)
    bias = torch.zeros(4096)
    bias[123] = 50.0  # far above every product: the winner whatever the row
    biased = Linear(dense.weight, bias.to(torch.bfloat16))
    rescored = rescored_head(biased, copy)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    for rows in (x[:1], x):
        out = rescored(rows)
        ref = F.linear(rows, biased.weight, biased.bias).float()
        assert (out.argmax(-1) == 123).all()
        assert torch.allclose(out[:, 123], ref[:, 123], atol=0.5)


@needs_native
def test_the_native_kernel_takes_its_block_maxima() -> None:
    weight = head(vocab=16 * int4.TOP_BLOCK, seed=10).weight
    packed, scale_low = int4.pack_int4_native(weight)
    x = torch.randn(11, 256, generator=torch.Generator().manual_seed(11)).to(torch.bfloat16)
    kernels = native.kernels()
    assert kernels is not None
    maxima = torch.empty(11, 16)
    out = kernels.int4_logits(x, packed, scale_low, block_max=maxima)
    assert out is not None
    assert torch.equal(out, kernels.int4_logits(x, packed, scale_low))
    assert torch.equal(maxima, out.view(11, 16, int4.TOP_BLOCK).amax(-1))
    # Each row count has its own code (2-4 rows a function of their own on AVX2): a row
    # scores the same in every one.
    for rows in range(1, 9):
        some = kernels.int4_logits(x[:rows], packed, scale_low, block_max=maxima[:rows])
        assert some is not None and torch.equal(some, out[:rows])
    with pytest.raises(ValueError, match="block_max"):
        kernels.int4_logits(x, packed, scale_low, block_max=torch.empty(11, 15))


@pytest.mark.parametrize("copy", COPIES)
@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
def test_the_heads_greedy_is_the_argmax_of_its_logits(copy: str, bias: bool) -> None:
    """``scores_and_greedy``'s argmax, found from block maxima and the rescored blocks where
    the engine's kernel runs, is torch.argmax of the logits it returns, ties included."""
    dense = head(vocab=64 * int4.TOP_BLOCK, seed=12)
    weight = dense.weight.clone()
    weight[5000] = weight[77]  # two tokens alike: their logits tie wherever they win
    bias_t = torch.zeros(64 * int4.TOP_BLOCK, dtype=torch.bfloat16) if bias else None
    rescored = rescored_head(Linear(weight, bias_t), copy)
    x = torch.randn(9, 256, generator=torch.Generator().manual_seed(13)).to(torch.bfloat16)
    x[0] = weight[77] * 40  # a row that both tied tokens win
    for rows in (x[:1], x):
        logits, greedy = rescored.scores_and_greedy(rows)
        assert greedy == torch.argmax(logits, dim=-1).tolist()
        assert torch.equal(logits, rescored(rows))
    assert greedy[0] == 77


@pytest.mark.parametrize("rows", [1, 3])
def test_top_indices_are_topk_s(rows: int) -> None:
    """The two-pass search finds exactly ``topk``'s columns, with ties and a winner's block
    holding several of the best (the case a one-per-block search would miss)."""
    torch.manual_seed(rows)
    scores = torch.randn(rows, 64 * int4.TOP_BLOCK)
    scores[0, 5 : 5 + 20] = 10.0 + torch.arange(20)  # 20 of the best in one block
    scores[-1, -3:] = 50.0  # ties at the end
    expected = scores.topk(32, dim=-1)
    maxima = scores.view(rows, -1, int4.TOP_BLOCK).amax(-1)
    for found in (int4.top_indices(scores, 32), int4.top_indices(scores, 32, maxima)):
        for row in range(rows):
            assert sorted(scores[row, found[row]].tolist()) == sorted(expected.values[row].tolist())
            assert len(set(found[row].tolist())) == 32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packing_leaves_the_weight_alone(dtype: torch.dtype) -> None:
    """A tied head's weight is the model's embedding table: packing its int8 copy must not
    touch it (a float32 weight was once divided by its scales in place, on the background
    thread, while the engine embedded tokens with it)."""
    weight = torch.randn(96, 64).to(dtype)
    before = weight.clone()
    assert int4.pack_int8_fbgemm(weight) is not None
    assert torch.equal(weight, before)


@pytest.mark.parametrize("layout", ["torch", "native"])
def test_the_packed_head_is_kept_between_starts(tmp_path: Path, layout: str) -> None:
    """A second start reads the int4 copy instead of packing again (3.4 s for Gemma 3's head):
    the same tensors, from one file named by the weight and layout; a damaged file is packed
    again."""
    weight = torch.randn(200, 128).to(torch.bfloat16)
    fresh = int4.pack_int4(weight) if layout == "torch" else int4.pack_int4_native(weight)
    first = int4.pack_int4_cached(weight, tmp_path, layout=layout)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"
    again = int4.pack_int4_cached(weight, tmp_path, layout=layout)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(first, fresh, strict=True))
    files[0].write_bytes(b"not a safetensors file")
    repaired = int4.pack_int4_cached(weight, tmp_path, layout=layout)
    assert all(torch.equal(a, b) for a, b in zip(first, repaired, strict=True))
    # Another weight, or the other layout, is another file.
    int4.pack_int4_cached(weight * 2, tmp_path, layout=layout)
    int4.pack_int4_cached(weight, tmp_path, layout="native" if layout == "torch" else "torch")
    assert len(list(tmp_path.iterdir())) == 3


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_native_rescoring_is_the_pytorch_one(dtype: torch.dtype) -> None:
    """``Kernels.int4_rescore`` rescores the columns ``top_indices`` picks (ties and NaNs
    included: a NaN ranks highest), to the dense logits ``bmm`` gives (up to the order of the
    sums: one bfloat16 rounding, a few float32 ulps), leaves every other score as it was, and
    finds ``argmax``'s winner (a NaN left unrescored: PyTorch's)."""
    kernels = native.kernels()
    assert kernels is not None
    if dtype == torch.bfloat16 and not kernels.library.pc_int4_rescore_available():
        pytest.skip("the bfloat16 rescoring kernel needs AVX512-BF16")
    vocab = 64 * int4.TOP_BLOCK
    weight = head(vocab=vocab, seed=14).weight.to(dtype)
    packed, scale_low = int4.pack_int4_native(weight)
    x = torch.randn(9, 256, generator=torch.Generator().manual_seed(15)).to(dtype)
    maxima = torch.empty(9, 64)
    scores = kernels.int4_logits(x, packed, scale_low, block_max=maxima)
    assert scores is not None
    scores[1, 3 * int4.TOP_BLOCK : 5 * int4.TOP_BLOCK] = scores[1].max()  # ties across blocks
    scores[2, 700:740] = float("nan")  # more NaNs than candidates: 8 stay
    maxima[:] = scores.view(9, 64, -1).amax(-1)
    want = scores.clone()
    top = int4.top_indices(want, 32, maxima)
    exact = torch.bmm(weight[top], x[:, :, None]).squeeze(-1)
    want.scatter_(1, top, exact.float())
    got = scores.clone()
    greedy = kernels.int4_rescore(got, maxima, x, weight, 32)
    assert greedy == torch.argmax(got, dim=-1).tolist()
    assert got[2].isnan().sum() == 8 and greedy[2] == int(got[2].isnan().nonzero()[0])
    changed = got != scores
    # The tied row: 32 of the tied columns (which ones, topk leaves open; the lowest here).
    tied = range(3 * int4.TOP_BLOCK, 3 * int4.TOP_BLOCK + 32)
    assert changed[1].nonzero().flatten().tolist() == list(tied)
    for r in (0, *range(3, 9)):
        picked = set(top[r].tolist())
        assert picked == set(torch.topk(scores[r], 32).indices.tolist())
        assert set(changed[r].nonzero().flatten().tolist()) <= picked
        tolerance = {"rtol": 2**-8, "atol": 0.0} if dtype == torch.bfloat16 else {}
        torch.testing.assert_close(got[r], want[r], **tolerance)
    other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
    assert kernels.int4_rescore(got, maxima, x.to(other), weight, 32) is None  # not its dtype

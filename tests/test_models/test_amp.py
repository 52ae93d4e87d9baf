"""Mixed precision: CPU autocast in bf16 and fp16 against fp32 on the same input and weights.

Under autocast the linear layers and attention run in half precision, but token scores and DC
sums accumulate in fp32 (``fatr_seg/ops/scoring.py``, ``fatr_seg/ops/reduce.py``), DC counts are
fp32 integers, and the selection differs from fp32 only where two scores are within rounding of
each other. bf16 keeps 8 significant bits (relative rounding 2^-9 ≈ 0.2 %), fp16 11 bits
(2^-12); the q·k products that feed the scores carry that error, so scores within a few tenths
of a percent of the selection threshold may swap. Away from the threshold nothing may change.
"""

import math

import pytest
import torch
from torch.testing import assert_close

from fatr_seg.layers import FATRVisionTransformer
from fatr_seg.ops import fold_tokens, init_state, select_topk

EMBED, HEADS, DEPTH, PATCH = 64, 4, 6, 8
GRID = (12, 16)  # 192 patch tokens
LAYERS = (2, 4, 5)
DTYPES = [torch.bfloat16, torch.float16]
# Relative rounding unit (machine epsilon) of each half format.
UNIT = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# Tiny models: one intra-op thread (see tests/conftest.py).
pytestmark = pytest.mark.usefixtures("single_thread")


def build(seed=0):
    """A reduced ViT with peaked attention (weights far from init), so scores are spread."""
    torch.manual_seed(seed)
    model = FATRVisionTransformer(
        img_size=(GRID[0] * PATCH, GRID[1] * PATCH), patch_size=PATCH, embed_dims=EMBED,
        num_layers=DEPTH, num_heads=HEADS, out_indices=(DEPTH - 1,),
        reduction=dict(layers=LAYERS, keep_ratio=0.7, windows=(2, 2, 1)),
    )  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
            elif p.dim() >= 2:
                p.copy_(noise / math.sqrt(p[0].numel()))
            else:
                p.copy_(0.1 * noise)
    return model.eval()


def images(seed=0, B=2):
    return torch.randn(B, 3, GRID[0] * PATCH, GRID[1] * PATCH,
                       generator=torch.Generator().manual_seed(seed))  # fmt: skip


@pytest.fixture(scope="module")
def model():
    return build()


@pytest.fixture(scope="module")
def fp32_run(model):
    x = images()
    with torch.no_grad():
        return model(x), model.reduction_trace(x)


def autocast_run(model, dtype):
    x = images()
    seen = []
    hook = model.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
            outs = model(x)
            traces = model.reduction_trace(x)
            states = [s for _, s in model.forward_tokens(x, out_indices=tuple(range(DEPTH)))]
    finally:
        hook.remove()
    assert seen and all(d == dtype for d in seen), "autocast did not run the model in " + str(dtype)
    return outs, traces, states


@pytest.mark.parametrize("dtype", DTYPES)
def test_autocast_outputs_are_finite_and_close_to_fp32(model, fp32_run, dtype):
    (out,), _, _ = autocast_run(model, dtype)
    (ref,), _ = fp32_run
    assert out.shape == ref.shape and torch.isfinite(out).all()
    # Loose: a token that changes sides at a near-tie (below) swaps its own feature for a DC mean
    # at its position; measured 0.06 (bf16) and 0.002 (fp16), 0.005 / 0.0007 without reduction.
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < (0.15 if dtype == torch.bfloat16 else 0.02)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scores_and_dc_counts_stay_fp32_and_exact(model, dtype):
    _, traces, states = autocast_run(model, dtype)
    N = GRID[0] * GRID[1]
    for trace in traces:
        assert trace.kept_scores.dtype == torch.float32
        assert torch.isfinite(trace.kept_scores).all()
    for state in states[LAYERS[0] - 1 :]:
        counts = state.dc_count
        assert counts.dtype == torch.float32
        assert_close(counts, counts.round(), rtol=0, atol=0)  # integers
        assert (counts.sum(1) + state.num_patches == N).all()
        # Each count is the number of original patches whose source is that DC token.
        folded = state.source - state.num_patches  # (B, N), >= 0 for folded patches
        for b in range(counts.shape[0]):
            hist = torch.bincount(folded[b][folded[b] >= 0], minlength=state.num_dc)
            assert_close(counts[b], hist.float(), rtol=0, atol=0)


def first_layer_scores(model, x):
    """HF scores (B, N) of every patch at the first reduction layer, as its reducer sees them."""
    with torch.no_grad():
        ((tokens, state),) = model.forward_tokens(x, out_indices=(LAYERS[0] - 2,))
        blk = model.blocks[LAYERS[0] - 1]
        _, stats = blk.attn(blk.norm1(tokens), None, 0, True)
        return blk.reducer.scores(tokens, stats, state, None)[0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_selection_matches_fp32_except_near_ties(model, fp32_run, dtype):
    _, ref_traces = fp32_run
    _, traces, _ = autocast_run(model, dtype)
    x = images()
    ref_scores = first_layer_scores(model, x)
    with torch.autocast("cpu", dtype=dtype):
        scores = first_layer_scores(model, x)
    assert scores.dtype == torch.float32
    # The scores are accurate to a few rounding units of the half format (measured: about 1.7).
    err = ((scores - ref_scores).abs() / ref_scores).amax(dim=1)  # (B,)
    assert (err <= 4 * UNIT[dtype]).all(), err

    # First layer (same token set in both runs): a token changes sides only if its fp32 score is
    # within the score error of the threshold, i.e. a near-tie.
    first, ref_first = traces[0], ref_traces[0]
    k = ref_first.kept.shape[1]
    for b in range(scores.shape[0]):
        threshold = ref_scores[b].sort(descending=True).values[k - 1]
        kept, ref_kept = set(first.kept[b].tolist()), set(ref_first.kept[b].tolist())
        for token in kept ^ ref_kept:
            gap = (ref_scores[b, token] - threshold).abs() / threshold
            assert gap <= 2 * err[b], f"token {token}: {gap:.2e} from the threshold"

    # Later layers start from possibly different sets; the overlap stays high.
    for trace, ref in zip(traces, ref_traces, strict=True):
        for b in range(trace.kept.shape[0]):
            a, r = set(trace.kept[b].tolist()), set(ref.kept[b].tolist())
            assert len(a & r) / len(a | r) >= 0.9


def test_dc_means_accumulate_in_fp32():
    """4,000 bf16 tokens around 3.0 folded into one window: a bf16 running sum would be off by
    tens of ulps (its step at 12,000 is 64); the fp32 sum gives the correctly rounded mean."""
    B, M, C = 2, 4000, 8
    gen = torch.Generator().manual_seed(0)
    x = (3.0 + torch.randn(B, 1 + M, C, generator=gen)).to(torch.bfloat16)
    scores = torch.rand(B, M, generator=gen)
    state = init_state(B, (40, 100), x.device)
    keep_pos, drop_pos = select_topk(scores, 1)
    out, new_state, rec = fold_tokens(x, state, keep_pos, drop_pos, scores, ("side", 1))
    assert out.dtype == torch.bfloat16 and new_state.dc_count.eq(M - 1).all()
    for b in range(B):
        folded = x[b, 1:][rec.folded[b]].double().mean(0)  # exact mean of the folded tokens
        assert_close(out[b, -1].double(), folded.to(torch.bfloat16).double(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_under_autocast_is_finite(dtype):
    model = build(seed=1).train()
    x = images(seed=1, B=1)
    with torch.autocast("cpu", dtype=dtype):
        (out,) = model(x)
        loss = out.float().square().mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name

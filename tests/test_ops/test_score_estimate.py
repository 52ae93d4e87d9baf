"""The query-subsampled HF score (issue 24, item 2): exact probabilities of a strided set of
query rows, averaged per column."""

import pytest
import torch

from fatr_seg.ops import attention_with_lse, hf_scores
from fatr_seg.ops.scoring import query_rows


def explicit(q, k, scale, bias, rows):
    logits = q[:, :, rows].double() @ k.double().transpose(-2, -1) * scale
    if bias is not None:
        logits = logits + bias.double()[:, None, None, :]
    return logits.softmax(-1).mean(dim=(1, 2))


@pytest.mark.parametrize("with_lse", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize(("n", "queries"), [(50, 8), (50, 64), (97, 16), (97, 1), (33, 33)])
def test_estimate_is_the_column_mean_of_the_strided_rows(n, queries, with_bias, with_lse):
    torch.manual_seed(0)
    B, h, d = 2, 3, 16
    q, k, v = (torch.randn(B, h, n, d) for _ in range(3))
    bias = None
    if with_bias:
        bias = torch.zeros(B, n)
        bias[:, -3:] = float("-inf")
        bias[:, 1:5] = 0.7
    lse = attention_with_lse(q, k, v, d**-0.5, bias)[1] if with_lse else None
    got = hf_scores(q, k, d**-0.5, key_bias=bias, lse=lse, queries=queries)
    rows = query_rows(n, queries)
    assert queries <= len(range(n)[rows]) < 2 * queries or len(range(n)[rows]) == n
    torch.testing.assert_close(got.double(), explicit(q, k, d**-0.5, bias, rows), rtol=1e-5,
                               atol=1e-7)  # fmt: skip
    if queries >= n:
        exact = hf_scores(q, k, d**-0.5, key_bias=bias, lse=lse)
        torch.testing.assert_close(got, exact, rtol=1e-6, atol=1e-8)


def test_rows_are_a_view_with_cls_first():
    rows = query_rows(1025, 128)
    assert rows == slice(None, None, 8) and len(range(1025)[rows]) == 129
    with pytest.raises(ValueError, match="positive"):
        query_rows(10, 0)


def test_reducer_reads_score_queries_from_its_config():
    """With as many rows as tokens the estimate is the exact score: the same reduction."""
    from fatr_seg.layers import FATRVisionTransformer

    def trace(queries):
        torch.manual_seed(0)
        red = dict(method="fatr", score_queries=queries)
        model = FATRVisionTransformer(img_size=64, patch_size=8, embed_dims=48, num_layers=12,
                                      num_heads=3, reduction=red).eval()  # fmt: skip
        with torch.no_grad():
            return model.reduction_trace(x)

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    want, got, coarse = trace(None), trace(65), trace(8)
    for a, b in zip(want, got, strict=True):
        assert torch.equal(a.kept, b.kept) and torch.equal(a.source, b.source)
    assert any(not torch.equal(a.kept, b.kept) for a, b in zip(want, coarse, strict=True))

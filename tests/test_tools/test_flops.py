"""MAC counting (``fatr_seg.analysis.flops``) and ``tools/get_flops.py``.

The counts are checked against closed forms written out here, independently of the code under
test: fused attention must cost ``2·n²·d`` MACs per head, a plain ViT
``12·n·C² + 2·n²·C`` per block plus the patch embedding, and the reduction's overhead (scoring,
DC term) must show up in the count.
"""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fatr_seg.analysis import analytic_vit_macs, count_macs, flop_formulas, token_schedule
from fatr_seg.analysis.flops_report import PAPER_REDUCTION
from fatr_seg.layers import FATRVisionTransformer
from fatr_seg.ops.attention import attention_with_lse
from fatr_seg.ops.scoring import hf_scores

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "fatr_get_flops_tool", REPO / "tools" / "get_flops.py"
)
get_flops = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(get_flops)

RED = PAPER_REDUCTION  # layers 4/7/10, keep 0.7, DC windows (2, 1, 1)
SDPA_CPU = "aten._scaled_dot_product_flash_attention_for_cpu"


def vit_s(reduction=None, img_size=224):
    return FATRVisionTransformer(
        img_size=img_size, embed_dims=384, num_layers=12, num_heads=6, reduction=reduction
    ).eval()


@pytest.mark.parametrize("B,h,n,d", [(1, 1, 64, 16), (2, 6, 197, 64), (3, 2, 33, 8)])
def test_fused_attention_counts_2n2d_per_head(B, h, n, d):
    q, k, v = (torch.randn(B, h, n, d) for _ in range(3))
    rep = count_macs(lambda: F.scaled_dot_product_attention(q, k, v))
    assert SDPA_CPU in rep.by_op, f"the fused CPU kernel did not run: {rep.by_op}"
    assert rep.macs == B * h * 2 * n * n * d  # n²d for q kᵀ, n²d for A v
    # The same call through the project's wrapper (which also returns the log-sum-exp).
    rep = count_macs(lambda: attention_with_lse(q, k, v, d**-0.5))
    assert rep.macs == B * h * 2 * n * n * d


def test_cross_attention_and_backward_counts():
    B, h, n_q, n_k, d = 2, 3, 30, 50, 16
    q = torch.randn(B, h, n_q, d, requires_grad=True)
    k = torch.randn(B, h, n_k, d, requires_grad=True)
    v = torch.randn(B, h, n_k, d, requires_grad=True)
    with FlopCounterMode(display=False, custom_mapping=flop_formulas()) as counter:
        F.scaled_dot_product_attention(q, k, v).sum().backward()
    flops = {str(op): f for op, f in counter.get_flop_counts()["Global"].items()}
    assert flops[SDPA_CPU] == 2 * B * h * n_q * n_k * (d + d)
    # Backward: q kᵀ again, dP = dO vᵀ, dV = Pᵀ dO, dQ = dS k, dK = dSᵀ q.
    assert flops[SDPA_CPU + "_backward"] == 2 * B * h * n_q * n_k * 5 * d


def test_inplace_batched_matmul_is_counted():
    # The chunked exact score accumulates with baddbmm_, which torch's registry misses.
    acc, a, b = torch.zeros(3, 1, 20), torch.randn(3, 1, 7), torch.randn(3, 7, 20)
    assert count_macs(lambda: acc.baddbmm_(a, b)).macs == 3 * 1 * 7 * 20
    B, h, n, d = 2, 3, 40, 16
    q, k = torch.randn(B, h, n, d), torch.randn(B, h, n, d)
    # Without the kernel's log-sum-exp: q kᵀ (n²·d per head) and the row-weighted column sum
    # (n² per head, the baddbmm_).
    rep = count_macs(lambda: hf_scores(q, k, d**-0.5, "exact", backend="chunked"))
    assert rep.macs == B * h * (n * n * d + n * n)


def vit_closed_form(n_tokens, dim, depth, num_patches, patch, in_chans=3):
    per_block = 12 * n_tokens * dim**2 + 2 * n_tokens**2 * dim
    return depth * per_block + num_patches * patch * patch * in_chans * dim


@pytest.mark.parametrize("img_size", [224, 160])
def test_vit_s_baseline_matches_closed_form(img_size):
    grid = img_size // 16
    rep = count_macs(vit_s(img_size=img_size), torch.zeros(1, 3, img_size, img_size))
    want = vit_closed_form(1 + grid * grid, 384, 12, grid * grid, 16)
    assert rep.macs == want
    assert rep.by_op[SDPA_CPU] == 12 * 2 * (1 + grid * grid) ** 2 * 384
    assert rep.scoring_macs == 0 and rep.dc_term_macs == 0


def test_token_schedule_deit_s():
    blocks = token_schedule((14, 14), 12, RED)
    # 196 patches: keep ceil(.7·196)=138 (+4 DC), ceil(.7·138)=97 (+1), ceil(.7·97)=68 (+1).
    assert [b.attn for b in blocks] == [197] * 4 + [143] * 3 + [99] * 3 + [70] * 2
    assert [b.mlp for b in blocks] == [197] * 3 + [143] * 3 + [99] * 3 + [70] * 3
    assert [b.dc for b in blocks] == [0] * 4 + [4] * 3 + [1] * 5
    assert [i for i, b in enumerate(blocks) if b.reduces] == [3, 6, 9]
    assert all(not b.reduces and b.attn == b.mlp == 197
               for b in token_schedule((14, 14), 12, None))  # fmt: skip
    # The default (merging): no DC tokens, 196 -> 138 -> 97 -> 68 patch tokens.
    merged = token_schedule((14, 14), 12, dict(method="fatr"))
    assert [b.attn for b in merged] == [197] * 4 + [139] * 3 + [98] * 3 + [69] * 2
    assert all(b.dc == 0 for b in merged)
    evit = token_schedule((14, 14), 12, dict(method="evit"))  # one fused token more each time
    assert [b.mlp for b in evit][3::3] == [1 + 138 + 1, 1 + 98 + 1, 1 + 70 + 1]


@pytest.mark.slow
def test_fatr_count_matches_schedule_and_shows_overhead():
    x = torch.zeros(1, 3, 224, 224)
    exact = count_macs(vit_s(RED), x)
    proxy = count_macs(vit_s(dict(RED, score="logit_proxy")), x)
    C, sched = 384, token_schedule((14, 14), 12, RED)
    n_red = [b.attn for b in sched if b.reduces]  # 197, 143, 99
    d_red = [b.dc for b in sched if b.reduces]  # DC tokens seen by the score: 0, 4, 1
    # Written out: tokens only, plus q kᵀ again per reduction (exact) or n·C (proxy), plus the
    # DC term 2·n·D·C in blocks after the first reduction.
    tokens_only = (
        sum(4 * b.attn * C * C + 2 * b.attn**2 * C + 8 * b.mlp * C * C for b in sched)
        + 196 * 16 * 16 * 3 * C
    )
    dc_term = sum(2 * b.attn * b.dc * C for b in sched[4:])
    # (+ D·n·C: the DC tokens' query logits, so that empty windows do not vote)
    assert exact.scoring_macs == sum(n * n * C + d * n * C for n, d in zip(n_red, d_red))
    assert proxy.scoring_macs == sum(n * C + d * n * C for n, d in zip(n_red, d_red))
    assert exact.dc_term_macs == proxy.dc_term_macs == dc_term
    assert exact.macs == tokens_only + exact.scoring_macs + dc_term
    assert proxy.macs == tokens_only + proxy.scoring_macs + dc_term
    assert exact.macs > proxy.macs  # the exact score's overhead is seen
    for rep, score in ((exact, "exact"), (proxy, "logit_proxy")):
        assert rep.macs == analytic_vit_macs((14, 14), C, 12, 16, reduction=dict(RED, score=score))
    assert (
        analytic_vit_macs((14, 14), C, 12, 16, reduction=RED, scoring=False, dc_term=False)
        == tokens_only
    )
    # DC aggregation adds one value per folded token and channel: (196-138) + (138-97) +
    # (97-68) folded patches, plus the 4 old DC tokens merged at layer 7 (and 1 at layer 10).
    assert exact.dc_aggregation_adds == ((196 - 138) + (138 - 97) + 4 + (97 - 68) + 1) * (C + 1)


@pytest.mark.slow
@pytest.mark.parametrize("keep", [0.5, 0.55, 0.7])
def test_default_count_matches_closed_form_and_skips_the_unread_score(keep):
    """The default (protected bipartite merging) at every budget: counted == closed form, and
    the exact HF score (n²·C) is paid only in the layers where something is still protected
    (below keep 0.6: none, so the default costs what plain bipartite matching costs)."""
    from fatr_seg.layers.config import ReductionConfig

    red = dict(method="fatr", keep_ratio=keep)
    rep = count_macs(vit_s(red), torch.randn(1, 3, 224, 224))
    assert rep.macs == analytic_vit_macs((14, 14), 384, 12, 16, reduction=red)
    # Against plain bipartite matching at the same budget (no score, every token matched).
    plain = count_macs(vit_s(dict(red, score="bipartite")), torch.randn(1, 3, 224, 224))
    cfg = ReductionConfig.from_dict(red, depth=12)

    def matching(m):  # ToMe's A×B cosine similarities on the head-dim keys
        return ((m + 1) // 2) * (m // 2) * 64

    extra, protected = 0, []
    for b in (b for b in token_schedule((14, 14), 12, red) if b.reduces):
        M = b.attn - 1
        P = cfg.num_protected(M, cfg.num_keep(0, M))
        protected.append(P)
        if P:
            extra += b.attn**2 * 384 + matching(M - P) - matching(M)
    assert rep.scoring_macs == plain.scoring_macs + extra
    if keep < 0.6:
        assert protected == [0, 0, 0] and rep.macs == plain.macs
    else:
        assert min(protected) > 1


def test_paper_table_cli(tmp_path, capsys):
    out = tmp_path / "paper.json"
    assert get_flops.main(["--paper-table", "--only", "DeiT-S/16", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "DeiT-S/16" in printed and "ViT-B/8" not in printed
    table = json.loads(out.read_text())
    assert table["schema"] == "fatr_seg.get_flops.paper_table/1"
    (row,) = table["rows"]
    assert row["tokens"] == 196
    assert row["baseline"] == pytest.approx(vit_closed_form(197, 384, 12, 196, 16) / 1e9, abs=1e-9)
    # Our count agrees with the paper within 2 % (baseline 4.6, FATR 3.0 GMACs).
    assert abs(row["rel_diff"]["baseline"]) <= 0.02
    assert abs(row["rel_diff"]["fatr_tokens_only"]) <= 0.02
    assert row["fatr_counted"] > row["fatr_tokens_only"]
    assert row["scoring_overhead"] == pytest.approx(
        row["fatr_counted"] - row["fatr_tokens_only"] - row["dc_term_overhead"], rel=1e-9
    )


def segmenter_head_macs(n, C, K, layers, mlp_ratio=4):
    """Segmenter mask head on n patch tokens + K class tokens: projections, layers, masks."""
    m = n + K
    per_layer = (4 + 2 * mlp_ratio) * m * C * C + 2 * m * m * C  # qkv, proj, MLP; q k^T and A V
    return n * C * C + layers * per_layer + n * C * C + K * C * C + n * K * C


@pytest.mark.slow
def test_get_flops_compare_mode(tmp_path):
    out = tmp_path / "flops.json"
    configs = [
        str(REPO / "configs" / "baseline_vit-s_ade20k.py"),
        str(REPO / "configs" / "fatr_ade20k.py"),
    ]
    # A 64x64 input (16 patch tokens) keeps this fast; the counts are exact at any size.
    assert get_flops.main([*configs, "--shape", "64", "64", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["schema"] == "fatr_seg.get_flops/1"
    assert result["shape"] == [64, 64] and result["tokens"] == 16
    base, fatr = result["models"]
    red = dict(method="fatr_local")  # the config's reduction (at test time)
    assert base["backbone"]["macs"] == analytic_vit_macs((4, 4), 384, 12, 16)
    assert fatr["backbone"]["macs"] == analytic_vit_macs((4, 4), 384, 12, 16, reduction=red)
    assert base["ratio"] == {"backbone": 1.0, "segmentor": 1.0}
    assert fatr["ratio"]["backbone"] == pytest.approx(
        fatr["backbone"]["macs"] / base["backbone"]["macs"], rel=1e-12
    )
    assert fatr["backbone"]["scoring_macs"] > 0
    # The Segmenter head (FATRSegmenterHead) runs on the baseline's 16 patch tokens and on
    # FATR's compact output: 16 -> 10 (two 2x2 windows folded) -> 6 -> 5 tokens.
    assert base["decode_head_macs"] == segmenter_head_macs(16, 384, 150, 2)
    assert fatr["decode_head_macs"] == segmenter_head_macs(5, 384, 150, 2)
    for m in (base, fatr):
        assert m["segmentor"]["macs"] == m["backbone"]["macs"] + m["decode_head_macs"]


def test_get_flops_requires_shape(capsys):
    with pytest.raises(SystemExit):
        get_flops.main([str(REPO / "configs" / "fatr_ade20k.py")])
    assert "--shape" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        get_flops.main(["--paper-table", "--only", "DeiT-Q"])
    assert "unknown model" in capsys.readouterr().err


def test_attention_flops_rejects_bad_shapes():
    from fatr_seg.analysis import attention_flops

    assert attention_flops((1, 2, 3, 4), (1, 2, 5, 4), (1, 2, 5, 6)) == 2 * 2 * 3 * 5 * (4 + 6)
    with pytest.raises(ValueError, match="disagree"):
        attention_flops((1, 2, 3, 4), (1, 2, 5, 8), (1, 2, 5, 4))
    assert math.isclose(count_macs(lambda: None).macs, 0)

"""TimmFATRVisionTransformer: timm's own models (random tiny weights) on fatr_seg's forward.

The reference is timm itself: ``timm.create_model`` with the same arguments and the same
weights, and its ``forward_features``. Families: ViT with CLS, ViT without (``global_pool='avg'``),
qk-norm, DINOv2 with and without registers, EVA-02 (RoPE, SwiGLU; and with its sub-LN and
separate q/k/v projections), DeiT-III (LayerScale); patch sizes 8, 14, 16; input sizes that are
the pretraining grid, another grid and no multiple of the patch size.
"""

import pytest
import timm
import torch
from timm.layers import apply_rot_embed_cat
from torch.testing import assert_close

from fatr_seg.layers import PRESETS, ReductionConfig, TimmFATRVisionTransformer, TokenReducer
from fatr_seg.layers.attention import AttnStats
from fatr_seg.layers.timm_vit import TimmTokenState, reduce_with_prefix
from fatr_seg.ops import attention_with_lse, cls_attention, init_state, select_topk

pytestmark = pytest.mark.usefixtures("single_thread")
TINY = dict(depth=3, embed_dim=48, num_heads=3)
FAMILIES = {
    # id: (timm model, create_model arguments, patch size)
    "vit_cls": ("vit_tiny_patch16_224", dict(TINY, img_size=64), 16),
    "vit_no_cls_avg": ("vit_tiny_patch16_224",
                       dict(TINY, img_size=64, class_token=False, global_pool="avg"), 16),
    "vit_qk_norm": ("vit_tiny_patch16_224", dict(TINY, img_size=64, qk_norm=True), 16),
    "vit_patch8": ("vit_small_patch8_224", dict(TINY, img_size=48), 8),
    "dinov2": ("vit_small_patch14_dinov2", dict(TINY, img_size=56), 14),
    "dinov2_reg4": ("vit_small_patch14_reg4_dinov2", dict(TINY, img_size=56), 14),
    "eva02": ("eva02_small_patch14_224", dict(TINY, img_size=56), 14),
    "eva02_sub_ln": ("eva02_small_patch14_224", dict(TINY, img_size=56, scale_mlp=True,
                     scale_attn_inner=True, qkv_fused=False), 14),
    "deit3": ("deit3_small_patch16_224", dict(TINY, img_size=64), 16),
    # An Eva with RoPE, one register and no CLS (average pooling).
    "eva_rope_reg1_no_cls": ("vit_base_patch16_rope_reg1_gap_256", dict(TINY, img_size=64), 16),
}  # fmt: skip
_CLASSIFIER = ("head.", "fc_norm.", "head_drop.", "attn_pool.")


def timm_model(name, kwargs, seed=0):
    """timm's model with every weight moved well off its init (LayerScale 1e-5 included)."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True,
                              dynamic_img_pad=True, **kwargs)  # fmt: skip
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()


def reduction(method, layers=(1, 2), **kwargs):
    """A reduction at ``layers``; the paper's form with DC windows 2x2 then 1x1."""
    if method == "fatr_paper":
        kwargs.setdefault("windows", (2, 1)[: len(layers)])
    for key in ("score", "keep_ratio"):  # a preset's per-layer values, its first stages
        value = PRESETS[method].get(key)
        if isinstance(value, tuple) and len(value) != len(layers) and key not in kwargs:
            kwargs[key] = value[: len(layers)]
    return dict(method=method, layers=layers, **kwargs)


def ours_from(model, name, kwargs, **options):
    ours = TimmFATRVisionTransformer(name, kwargs, **options)
    own = ours.state_dict()
    state = {k: v for k, v in model.state_dict().items()
             if k in own or not k.startswith(_CLASSIFIER)}  # fmt: skip
    result = ours.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert all(k.endswith(("omega1", "omega2", "dc_pos")) for k in result.missing_keys)
    return ours.eval()


def images(size, B=2, seed=0):
    return torch.randn(B, 3, *size, generator=torch.Generator().manual_seed(seed))


def sizes(patch, kwargs):
    s = kwargs["img_size"]
    return [(s, s), (3 * patch + 5, 5 * patch - 3)]  # the stored grid; another, padded


def timm_grid(model, x):
    """timm's forward_features patch tokens as a (B, C, H, W) map."""
    tokens = model.forward_features(x)[:, model.num_prefix_tokens :]
    p = model.patch_embed.patch_size[0]
    H, W = -(-x.shape[2] // p), -(-x.shape[3] // p)
    return tokens.transpose(1, 2).reshape(x.shape[0], -1, H, W)


# ---------------------------------------------------------------------------------------------
# Reduction off (and at keep 1.0): timm's forward_features
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("family", list(FAMILIES))
def test_reduction_off_equals_timm_forward_features(family):
    name, kwargs, patch = FAMILIES[family]
    model = timm_model(name, kwargs)
    ours = ours_from(model, name, kwargs)
    for size in sizes(patch, kwargs):
        x = images(size)
        assert_close(ours(x)[0], timm_grid(model, x), rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("method", ["fatr", "fatr_paper"])
@pytest.mark.parametrize("family", ["vit_cls", "vit_no_cls_avg", "dinov2_reg4", "eva02", "deit3"])
def test_keep_one_equals_timm_forward_features(family, method):
    name, kwargs, patch = FAMILIES[family]
    model = timm_model(name, kwargs)
    red = reduction(method, keep_ratio=1.0)
    ours = ours_from(model, name, kwargs, reduction=red)
    x = images(sizes(patch, kwargs)[1])
    assert_close(ours(x)[0], timm_grid(model, x), rtol=1e-5, atol=1e-5)
    assert_close(ours(x)[0], ours_from(model, name, kwargs)(x)[0], rtol=0, atol=0)


@torch.no_grad()
def test_state_dict_keys_are_timms_plus_the_reductions_own():
    for family in ("vit_cls", "dinov2_reg4", "eva02_sub_ln", "deit3"):
        name, kwargs, _ = FAMILIES[family]
        model = timm_model(name, kwargs)
        ours = TimmFATRVisionTransformer(name, kwargs, reduction=reduction("fatr_paper"))
        theirs = {k for k in model.state_dict() if not k.startswith(_CLASSIFIER)}
        extra = set(ours.state_dict()) - theirs
        assert theirs <= set(ours.state_dict()), family
        assert extra == {"blocks.1.attn.omega1", "blocks.1.attn.omega2", "blocks.2.attn.omega1",
                         "blocks.2.attn.omega2", "blocks.0.reducer.dc_pos",
                         "blocks.1.reducer.dc_pos"}, family  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Prefix tokens: the reducer's view gives the whole sequence's scores and leaves them alone
# ---------------------------------------------------------------------------------------------
def prefixed_sequence(P, grid=(4, 5), B=2, h=2, d=8, seed=0, dc_counts=None):
    """A sequence [P prefix, patches, DC] with its state, q, k and the attention's lse."""
    gen = torch.Generator().manual_seed(seed)
    N = grid[0] * grid[1]
    base = init_state(B, grid, torch.device("cpu"))
    M, D = N, 0
    if dc_counts is not None:  # the last patches folded into the first DC token
        D = len(dc_counts)
        folded = int(dc_counts[0])
        M = N - folded
        source = torch.cat([torch.arange(M), torch.full((folded,), M)]).expand(B, N)
        base = base.replace(source=source, patch_idx=base.patch_idx[:, :M],
                            dc_count=torch.tensor(dc_counts).float().expand(B, D),
                            dc_grid=("side", 1))  # fmt: skip
    state = TimmTokenState(hw_shape=base.hw_shape, source=base.source, patch_idx=base.patch_idx,
                           dc_count=base.dc_count, dc_grid=base.dc_grid, num_prefix=P)  # fmt: skip
    n = P + M + D
    q, k, v = (torch.randn(B, h, n, d, generator=gen) for _ in range(3))
    x = torch.randn(B, n, h * d, generator=gen)
    key_bias = state.key_bias()
    _, lse = attention_with_lse(q, k, v, d**-0.5, key_bias)
    return x, state, q, k, lse, key_bias


def whole_sequence_hf(q, k, key_bias, state):
    """The HF score of every patch over the whole sequence, naively: mean attention received
    from every query row but those of empty DC tokens."""
    logits = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    if key_bias is not None:
        logits = logits + key_bias[:, None, None, :]
    attn = logits.softmax(-1)  # (B, h, n, n)
    rows = torch.ones(attn.shape[2], dtype=torch.bool)
    if state.num_dc:
        rows[-state.num_dc :] = state.dc_count[0] > 0
    P, M = state.num_prefix, state.num_patches
    return attn[:, :, rows].mean(dim=(1, 2))[:, P : P + M]


def hf_reducer(keep=0.5, score="hf"):
    cfg = ReductionConfig.from_dict(dict(method="fatr", score=score, layers=(1,),
                                         keep_ratio=keep, reweight=None))  # fmt: skip
    return TokenReducer(cfg, 0, 16)


@torch.no_grad()
@pytest.mark.parametrize("with_lse", [True, False])
@pytest.mark.parametrize("dc_counts", [None, (4.0, 0.0)])
@pytest.mark.parametrize("P", [0, 1, 5])
def test_prefix_view_scores_the_whole_sequence(P, dc_counts, with_lse):
    x, state, q, k, lse, key_bias = prefixed_sequence(P, dc_counts=dc_counts)
    stats = AttnStats(q, k, q.shape[-1] ** -0.5, lse if with_lse else None)
    y, new_state, record = reduce_with_prefix(hf_reducer(), x, stats, state, key_bias)
    expected, _ = select_topk(whole_sequence_hf(q, k, key_bias, state), record.kept.shape[1])
    assert torch.equal(record.kept, state.patch_idx.gather(1, expected))
    # The prefix tokens come out untouched, in front; the rest is the reduced sequence.
    assert torch.equal(y[:, :P], x[:, :P])
    assert y.shape[1] == P + new_state.num_patches + new_state.num_dc
    assert isinstance(new_state, TimmTokenState) and new_state.num_prefix == P


@torch.no_grad()
@pytest.mark.parametrize("P", [1, 5])
def test_prefix_view_keeps_evits_cls_attention(P):
    x, state, q, k, lse, key_bias = prefixed_sequence(P)
    stats = AttnStats(q, k, q.shape[-1] ** -0.5, lse)
    cfg = ReductionConfig.from_dict(dict(method="evit", layers=(1,), keep_ratio=0.5))
    _, _, record = reduce_with_prefix(TokenReducer(cfg, 0, 16), x, stats, state, key_bias)
    cls = cls_attention(q, k, stats.scale, key_bias)[:, P : P + state.num_patches]
    expected, _ = select_topk(cls, record.kept.shape[1])  # the kept patches (not the fused one)
    assert torch.equal(record.kept, expected)


@torch.no_grad()
@pytest.mark.parametrize("family", ["vit_no_cls_avg", "dinov2_reg4", "eva02"])
def test_prefix_tokens_are_never_merged_or_restored(family):
    name, kwargs, patch = FAMILIES[family]
    model = timm_model(name, kwargs)
    ours = ours_from(model, name, kwargs, reduction=dict(method="fatr", layers=(1, 2),
                                                         keep_ratio=0.5))  # fmt: skip
    x = images(sizes(patch, kwargs)[1])
    P = model.num_prefix_tokens
    tokens, state = ours.embed(x)
    prefix = tokens[:, :P]
    for blk in ours.blocks[:2]:
        before = tokens
        tokens, state, record = blk(tokens, state)
        assert tokens.shape[1] == P + state.num_patches + state.num_dc
        assert record.kept.min() >= 0  # only grid cells are kept or merged
    # The prefix tokens went through the blocks as tokens of their own (same count, in front).
    assert before.shape[1] > tokens.shape[1] and prefix.shape[1] == P
    grid = ours(x)[0]
    assert grid.shape[2:] == state.hw_shape  # only patches restored, never a prefix token


# ---------------------------------------------------------------------------------------------
# RoPE: a token's rotation is its grid cell's (a merged token's: its representative's)
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def test_rope_follows_the_representative_and_dc_tokens_are_not_rotated():
    table = torch.randn(12, 8)  # (N, 2d) sin | cos
    base = init_state(2, (3, 4), torch.device("cpu"))
    patch_idx = torch.tensor([[0, 5, 7, 11], [1, 2, 3, 9]])
    state = TimmTokenState(hw_shape=(3, 4), source=base.source, patch_idx=patch_idx,
                           dc_count=torch.ones(2, 1), rope=table)  # fmt: skip
    rope = state.token_rope()
    assert rope.shape == (2, 1, 5, 8)
    assert torch.equal(rope[:, 0, :4], table[patch_idx])
    assert torch.equal(rope[:, 0, 4], torch.tensor([0.0] * 4 + [1.0] * 4).expand(2, 8))
    x = torch.randn(2, 1, 5, 4)
    assert torch.equal(apply_rot_embed_cat(x, rope)[:, :, 4], x[:, :, 4])  # angle 0


@torch.no_grad()
def test_eva02_reduced_keeps_the_rope_of_every_kept_token():
    """With keep ratio 1 at a layer, nothing moves; at 0.5 the kept tokens' rotation rows are
    their own cells' rows of timm's table for the input's grid."""
    name, kwargs, patch = FAMILIES["eva02"]
    ours = ours_from(timm_model(name, kwargs), name, kwargs,
                     reduction=dict(method="fatr", layers=(1,), keep_ratio=0.5))  # fmt: skip
    x = images((4 * patch, 6 * patch))
    tokens, state = ours.embed(x)
    table = ours.rope.get_embed(shape=(4, 6))
    assert torch.equal(state.rope, table)
    tokens, state, _ = ours.blocks[0](tokens, state)
    assert state.num_patches == 12
    assert torch.equal(state.token_rope()[:, 0], table[state.patch_idx])


# ---------------------------------------------------------------------------------------------
# The FATRVisionTransformer API on timm's weights
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("family", ["vit_cls", "dinov2_reg4", "eva02"])
def test_set_keep_ratio_equals_building_with_it(family):
    name, kwargs, patch = FAMILIES[family]
    model = timm_model(name, kwargs)
    a = ours_from(model, name, kwargs, reduction=dict(method="fatr", layers=(1, 2)))
    b = ours_from(model, name, kwargs, reduction=dict(method="fatr", layers=(1, 2),
                                                      keep_ratio=0.55))  # fmt: skip
    a.set_keep_ratio(0.55)
    x = images(sizes(patch, kwargs)[1])
    assert_close(a(x)[0], b(x)[0], rtol=0, atol=0)


@torch.no_grad()
@pytest.mark.parametrize("family", ["vit_no_cls_avg", "dinov2_reg4", "eva02"])
def test_compact_output_restores_to_the_full_grid_output(family):
    name, kwargs, patch = FAMILIES[family]
    model = timm_model(name, kwargs)
    red = dict(method="fatr", layers=(1, 2), keep_ratio=0.6)
    full = ours_from(model, name, kwargs, reduction=red, out_indices=(0, 2))
    compact = ours_from(model, name, kwargs, reduction=red, out_indices=(0, 2),
                        compact_output=True)  # fmt: skip
    x = images(sizes(patch, kwargs)[1])
    for c, f in zip(compact(x), full(x), strict=True):
        assert_close(c.restore(), f, rtol=0, atol=0)


@torch.no_grad()
@pytest.mark.parametrize("family", ["vit_no_cls_avg", "dinov2_reg4", "eva02"])
def test_fused_and_explicit_attention_agree(family):
    name, kwargs, patch = FAMILIES[family]
    model = timm_model(name, kwargs)
    red = reduction("fatr_paper", keep_ratio=0.6)
    fused = ours_from(model, name, kwargs, reduction=red, fused_attn=True)
    explicit = ours_from(model, name, kwargs, reduction=red, fused_attn=False)
    x = images(sizes(patch, kwargs)[1])
    assert [t.kept.tolist() for t in fused.reduction_trace(x)] == \
        [t.kept.tolist() for t in explicit.reduction_trace(x)]  # fmt: skip
    assert_close(fused(x)[0], explicit(x)[0], rtol=1e-4, atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("family", ["dinov2_reg4", "eva02"])
def test_omega1_at_zero_skips_the_reweighting_exactly(family, monkeypatch):
    from fatr_seg.layers.attention import ReweightedCore

    name, kwargs, patch = FAMILIES[family]
    model = timm_model(name, kwargs)
    ours = ours_from(model, name, kwargs, reduction=reduction("fatr_local", layers=(1, 2)))
    attns = [m for m in ours.modules() if isinstance(m, ReweightedCore) and m.reweight]
    assert attns and all(a.hp_is_identity() for a in attns)  # omega1 at its init, read at eval
    x = images(sizes(patch, kwargs)[1])
    skipped = ours(x)[0]
    monkeypatch.setattr(ReweightedCore, "hp_is_identity", lambda self: False)
    assert torch.equal(skipped, ours(x)[0])


def test_output_cls_token_is_timms_cls_token():
    name, kwargs, patch = FAMILIES["dinov2_reg4"]
    model = timm_model(name, kwargs)
    ours = ours_from(model, name, kwargs, output_cls_token=True)
    x = images((56, 56))
    with torch.no_grad():
        grid, cls = ours(x)[0]
        assert_close(cls, model.forward_features(x)[:, 0], rtol=1e-5, atol=1e-5)


def test_fc_norm_as_the_final_norm():
    """EVA-02 pools with 'avg': timm's ``norm`` is an Identity and its classifier's ``fc_norm``
    can be the final norm instead, per token."""
    name, kwargs, patch = FAMILIES["eva02"]
    model = timm_model(name, kwargs)
    assert isinstance(model.norm, torch.nn.Identity)
    ours = ours_from(model, name, kwargs, final_norm="fc_norm")
    x = images((56, 56))
    with torch.no_grad():
        expected = model.fc_norm(model.forward_features(x)[:, 1:])
        assert_close(ours(x)[0].flatten(2).transpose(1, 2), expected, rtol=1e-5, atol=1e-5)


def test_gradients_reach_timms_weights_and_the_reductions_own():
    name, kwargs, patch = FAMILIES["eva02"]
    ours = TimmFATRVisionTransformer(
        name, dict(kwargs, drop_path_rate=0.1), reduction=reduction("fatr_paper")
    )
    ours.train()
    ours(images((56, 70)))[0].square().mean().backward()
    for key in ("patch_embed.proj.weight", "pos_embed", "cls_token", "blocks.0.attn.q_bias",
                "blocks.2.attn.omega1", "blocks.2.attn.omega2", "blocks.0.reducer.dc_pos",
                "blocks.2.mlp.fc2.weight"):  # fmt: skip
        grad = ours.get_parameter(key).grad
        assert grad is not None and grad.abs().sum() > 0, key


@pytest.mark.parametrize("method", list(PRESETS))
@pytest.mark.parametrize("family", ["vit_no_cls_avg", "dinov2_reg4", "eva02"])
def test_every_preset_runs_on_every_prefix_layout(family, method):
    """No prefix, CLS + registers, RoPE: every method's preset at its own layers (12 blocks)
    runs forward (also under bf16 autocast) and backward, and restores the full grid."""
    name, kwargs, patch = FAMILIES[family]
    if method == "evit" and family == "vit_no_cls_avg":
        pytest.skip("EViT reads the CLS token's attention (refused at build, tested below)")
    model = TimmFATRVisionTransformer(name, dict(kwargs, depth=12), reduction=dict(method=method))
    x = images((6 * patch + 3, 7 * patch))
    grid = (7, 7)
    with torch.no_grad():
        assert model.eval()(x)[0].shape == (2, 48, *grid)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.isfinite(model(x)[0]).all()
    out = model.train()(x)[0]
    out.square().mean().backward()
    assert out.shape == (2, 48, *grid) and model.patch_embed.proj.weight.grad is not None


def test_gradient_checkpointing_gives_the_same_gradients():
    name, kwargs, patch = FAMILIES["eva02"]
    model = timm_model(name, kwargs)
    grads = []
    for with_cp in (False, True):
        ours = ours_from(model, name, kwargs, reduction=reduction("fatr"), with_cp=with_cp)
        ours.train()(images((56, 70)))[0].square().mean().backward()
        grads.append({n: p.grad for n, p in ours.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for key, grad in grads[0].items():
        assert_close(grads[1][key], grad, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Errors at build time name the model and what is missing
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,kwargs,message",
    [
        ("vit_small_r26_s32_224", dict(), r"'vit_small_r26_s32_224' is not supported.*HybridEmbed "
         r"\(a CNN stem, hybrid model\)"),
        ("swin_tiny_patch4_window7_224", dict(depths=(1, 1, 1, 1)),
         r"'swin_tiny_patch4_window7_224' is not supported.*hierarchical"),
        ("vit_tiny_patch16_224", dict(depth=2, patch_drop_rate=0.5), "patch_drop_rate > 0"),
        ("vit_tiny_patch16_224", dict(depth=2, pretrained=True), "checkpoint=PATH"),
        ("vit_tiny_patch16_224", dict(depth=2, dynamic_img_size=False), "always True"),
        ("vit_not_a_model", dict(), "timm has no model 'vit_not_a_model'"),
        ("deit_tiny_distilled_patch16_224", dict(depth=2), "VisionTransformerDistilled"),
        ("eva02_small_patch14_224", dict(depth=2, use_post_norm=True), "EvaBlockPostNorm"),
        ("vit_small_patch16_18x2_224", dict(depth=2), "ParallelThingsBlock"),
        ("vit_small_patch16_rope_224", dict(depth=2), "attention is AttentionRope"),
        ("vit_small_patch16_rope_mixed_224", dict(depth=2), "RotaryEmbeddingMixed"),
    ],
)  # fmt: skip
def test_unsupported_models_fail_at_build_naming_them(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        TimmFATRVisionTransformer(name, kwargs)


def test_invalid_options_fail_at_build():
    no_cls = dict(depth=2, img_size=64, class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="'cls' .*has no class token"):
        TimmFATRVisionTransformer("vit_tiny_patch16_224", no_cls,
                                  reduction=dict(method="evit", layers=(1, 2)))  # fmt: skip
    registers_only = dict(depth=2, class_token=False, reg_tokens=4, global_pool="avg")
    with pytest.raises(ValueError, match="'cls' .*has no class token"):
        TimmFATRVisionTransformer("vit_tiny_patch16_224", registers_only,
                                  reduction=dict(method="evit", layers=(1, 2)))  # fmt: skip
    with pytest.raises(ValueError, match="output_cls_token=True needs a class token"):
        TimmFATRVisionTransformer("vit_tiny_patch16_224", no_cls, output_cls_token=True)
    with pytest.raises(ValueError, match="has no fc_norm"):
        TimmFATRVisionTransformer("vit_tiny_patch16_224", dict(depth=2), final_norm="fc_norm")
    with pytest.raises(ValueError, match="reduction.layers"):
        TimmFATRVisionTransformer("vit_tiny_patch16_224", dict(depth=2),
                                  reduction=dict(layers=(4,)))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Real weights: timm's ViT-Ti/16 through timm and through FATRVisionTransformer
# ---------------------------------------------------------------------------------------------
def real_vit_ti():
    from camvid_data import REAL_VIT_TI, SHARED_HINT
    from safetensors.torch import load_file

    if not REAL_VIT_TI.is_file():
        pytest.skip(f"real ViT-Ti weights not found at {REAL_VIT_TI} ({SHARED_HINT})")
    return {k: v for k, v in load_file(str(REAL_VIT_TI)).items() if not k.startswith("head.")}


@torch.no_grad()
@pytest.mark.parametrize("size", [(224, 224), (360, 480)])
@pytest.mark.parametrize("method", ["fatr", "fatr_paper", "tome"])
def test_real_vit_ti_timm_path_equals_fatrvit(method, size):
    """The same file in both backbones, the same reduction dict (whatever the preset holds):
    the same kept tokens at every reduction layer and the same features.

    At 360x480 (padded to 368x480, 23x30 = 690 tokens) both are built for that grid and given
    the same positional embedding: resampled by timm (``antialias=True``, as timm's own forward
    resamples), which FATRVisionTransformer's resampling (mmseg's, no antialiasing) does not
    reproduce; docs/timm.md, "FATRViT and TimmFATRViT".
    """
    from timm.layers import resample_abs_pos_embed

    from fatr_seg.layers import FATRVisionTransformer

    state = real_vit_ti()
    grid = (-(-size[0] // 16), -(-size[1] // 16))
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], grid, (14, 14))
    img_size = (grid[0] * 16, grid[1] * 16)
    red = dict(method=method)
    fatr = FATRVisionTransformer(img_size, embed_dims=192, num_heads=3, reduction=red).eval()
    timm_path = TimmFATRVisionTransformer(
        "vit_tiny_patch16_224", dict(img_size=img_size), reduction=red
    ).eval()
    for model in (fatr, timm_path):
        result = model.load_state_dict(state, strict=False)
        assert not result.unexpected_keys
        assert all(k.endswith(("omega1", "omega2", "dc_pos")) for k in result.missing_keys)
    # Smooth images (noise upsampled), closer to photographs than white noise.
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 3, size[0] // 16, size[1] // 16, generator=gen)
    x = torch.nn.functional.interpolate(noise, size=size, mode="bilinear", align_corners=False)
    ours, theirs = timm_path.reduction_trace(x), fatr.reduction_trace(x)
    assert len(ours) == len(theirs) == len(fatr.reduction.layers)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a.kept, b.kept) and torch.equal(a.source, b.source)
    assert_close(timm_path(x)[0], fatr(x)[0], rtol=1e-4, atol=1e-4)

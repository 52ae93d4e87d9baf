"""ReductionConfig: presets, normalisation, and a ValueError naming the key for every bad value."""

import dataclasses

import pytest

from fatr_seg.layers import PRESETS, REDUCTION_DEFAULTS, FATRVisionTransformer, ReductionConfig


def test_default_is_the_fatr_preset():
    cfg = ReductionConfig.from_dict({})
    assert cfg.method == "fatr"  # an empty dict; the configs' default is REDUCTION_DEFAULTS
    default = ReductionConfig.from_dict(REDUCTION_DEFAULTS)
    assert default == ReductionConfig.from_dict(dict(method="fatr_local", reduce_in_training=False))
    assert cfg.layers == (4, 7, 10) and cfg.keep_ratio == (0.7, 0.7, 0.7) and cfg.r is None
    assert cfg.score == ("hf_bipartite",) * 3 and cfg.aggregate == ("merge",) * 3
    assert cfg.protect == 0.2 and not cfg.prop_attn and cfg.score_queries is None
    assert cfg.reweight == "identity" and cfg.restore == "copy"
    assert cfg.windows is None and cfg.window_size is None
    assert ReductionConfig.from_dict(None) is None
    assert ReductionConfig.from_dict(cfg) is cfg
    assert cfg.index(3) == 0 and cfg.index(6) == 1 and cfg.index(0) is None
    # the early local stage (block 2: whole 2x2 windows by HF priority), two global stages
    local = ReductionConfig.from_dict(dict(method="fatr_local"))
    assert local.layers == (2, 5, 8) and local.keep_ratio == (0.55, 0.6, 0.8)
    assert local.score == ("window_hf", "hf_bipartite", "hf_bipartite")
    assert local.local_window == 2 and local.prop_attn and local.protect == 0.2


def test_normalisation_and_aliases():
    cfg = ReductionConfig.from_dict(dict(method="fatr_paper", layers=[2, 5], keep_ratio=[0.5, 1],
                                         windows=[4, 2], score="exact", restore="dc"))  # fmt: skip
    assert cfg.layers == (2, 5) and cfg.keep_ratio == (0.5, 1.0) and cfg.windows == (4, 2)
    assert isinstance(cfg.keep_ratio[1], float)
    assert cfg.score == ("hf", "hf") and cfg.restore == "copy"  # the earlier names
    assert ReductionConfig.from_dict(dict(score="logit_proxy")).score == ("hf_proxy",) * 3
    assert ReductionConfig.from_dict(dict(reweight=None)).reweight is None
    assert cfg.dc_grid(0) == ("side", 4) and cfg.dc_grid(1) == ("side", 2)
    by_size = ReductionConfig.from_dict(dict(aggregate="dc", window_size=4))
    assert by_size.window_size == (4, 4, 4) and by_size.dc_grid(2) == ("size", 4)
    assert ReductionConfig.from_dict(dict(aggregate="merge")).dc_grid(0) is None
    # DC windows without an aggregation: the DC aggregation (as before merging existed)
    assert ReductionConfig.from_dict(dict(windows=(2, 2, 1))).aggregate == ("dc",) * 3
    assert ReductionConfig.from_dict(dict(window_size=3)).aggregate == ("dc",) * 3


@pytest.mark.parametrize("method", sorted(PRESETS))
def test_every_preset_builds_and_is_its_own(method):
    cfg = ReductionConfig.from_dict(dict(method=method))
    assert cfg.method == method
    for key, value in PRESETS[method].items():
        got = getattr(cfg, key)
        want = value if isinstance(value, tuple) or value is None or isinstance(value, bool) else (
            (value,) * len(cfg.layers) if key in ("keep_ratio", "r", "score", "aggregate")
            else value)  # fmt: skip
        assert got == want, key


def test_peers_keep_their_own_defaults():
    """A peer named by method= does not inherit FATR's reweighting or score."""
    for method in ("tome", "tome_constant", "evit", "algm"):
        cfg = ReductionConfig.from_dict(dict(method=method))
        assert cfg.reweight is None, method
        assert "hf" not in cfg.score, method
    assert ReductionConfig.from_dict(dict(method="tome")).aggregate == ("merge",) * 3
    assert ReductionConfig.from_dict(dict(method="evit")).aggregate == ("fuse",) * 3
    assert ReductionConfig.from_dict(dict(method="algm")).prop_attn is False
    assert ReductionConfig.from_dict(dict(method="tome")).prop_attn is True


def test_budget_by_count():
    cfg = ReductionConfig.from_dict(dict(method="tome_constant", layers=(1, 2), r=5))
    assert cfg.r == (5, 5) and cfg.keep_ratio is None
    assert cfg.num_keep(0, 30) == 25 and cfg.num_keep(0, 8) == 4  # bipartite: at most half
    assert ReductionConfig.from_dict(dict(r=3)).keep_ratio is None
    assert ReductionConfig.from_dict(dict(method="tome_constant", keep_ratio=0.8)).r is None


def test_frozen():
    cfg = ReductionConfig.from_dict({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.keep_ratio = (0.5, 0.5, 0.5)


BAD = [
    # (key, overrides)
    ("layers", dict(layers=(0, 7, 10))),  # 1-indexed
    ("layers", dict(layers=(-1, 7, 10))),
    ("layers", dict(layers=(7, 4, 10))),  # unsorted
    ("layers", dict(layers=(4, 4, 10))),  # repeated
    ("layers", dict(layers=(4.0, 7, 10))),
    ("layers", dict(layers=(), keep_ratio=())),
    ("keep_ratio", dict(keep_ratio=0.0)),
    ("keep_ratio", dict(keep_ratio=-0.3)),
    ("keep_ratio", dict(keep_ratio=1.2)),
    ("keep_ratio", dict(keep_ratio=(0.7, 0.7))),  # one per layer, or one for all
    ("keep_ratio", dict(keep_ratio=(0.7, 0.7, 1.5))),
    ("keep_ratio", dict(keep_ratio=float("nan"))),
    ("keep_ratio", dict(keep_ratio=0.7, r=4)),  # one budget
    ("r", dict(r=-1)),
    ("r", dict(r=2.5)),
    ("windows", dict(method="fatr_paper", windows=(2, 1))),  # length must match layers
    ("windows", dict(method="fatr_paper", windows=(2, 2, 1, 1))),
    ("windows", dict(method="fatr_paper", windows=(3, 2, 1))),  # 2 does not divide 3
    ("windows", dict(method="fatr_paper", windows=(1, 2, 2))),  # growing
    ("windows", dict(method="fatr_paper", windows=(2, 0, 0))),
    ("windows", dict(method="fatr_paper", windows=(2, 2.0, 1))),
    ("windows", dict(method="fatr_paper", layers=(2, 5))),  # the preset's 3 windows, 2 layers
    ("windows", dict(aggregate="merge", windows=(2, 2, 1))),  # 'merge' has no DC windows
    ("window_size", dict(aggregate="dc", window_size=(4, 2, 2))),  # must grow
    ("windows", dict(aggregate="dc", window_size=4, windows=2)),  # one of the two
    ("aggregate", dict(aggregate="dc")),  # DC windows not given
    ("aggregate", dict(aggregate="mean")),
    ("aggregate", dict(score="bipartite", aggregate="dc", windows=1)),  # partners need merge
    ("aggregate", dict(aggregate="fuse")),  # fusion weights come from the CLS score
    ("score", dict(score="cosine")),
    ("score", dict(score=("hf", "window", "hf"))),  # windows need the unreduced grid
    # the early local stage: first reduction layer only, at most w² - 1 of every w² tokens go
    ("score", dict(layers=(2, 3), keep_ratio=0.7, score=("hf_bipartite", "window_hf"))),
    ("keep_ratio", dict(layers=(1,), keep_ratio=0.24, score="window_hf")),
    ("keep_ratio", dict(layers=(1,), keep_ratio=0.1, score="window_random", local_window=3)),
    ("local_window", dict(layers=(1,), keep_ratio=0.5, score="window_hf", local_window=1)),
    ("local_window", dict(layers=(1,), keep_ratio=0.5, score="window_hf", local_window=2.0)),
    (
        "aggregate",
        dict(layers=(1,), keep_ratio=0.5, score="window_hf", aggregate="dc", windows=2),
    ),  # fmt: skip
    ("keep_ratio", dict(method="tome", keep_ratio=0.4)),  # bipartite merges at most half
    ("keep_ratio", dict(method="tome", keep_ratio=(0.7, 0.49, 0.9))),
    ("method", dict(method="dct")),
    ("method", dict(method="evit_")),
    ("metric", dict(metric="values")),
    ("merge_radius", dict(merge_radius=0)),
    ("merge_radius", dict(merge_radius=1.5)),
    ("prop_attn", dict(prop_attn="yes")),
    ("reduce_in_training", dict(reduce_in_training=0)),
    ("reweight", dict(reweight="none")),
    ("reweight", dict(reweight=True)),
    ("restore", dict(restore="nearest")),
]


@pytest.mark.parametrize("key,overrides", BAD, ids=[f"{k}-{i}" for i, (k, _) in enumerate(BAD)])
def test_invalid_values_raise_naming_the_key(key, overrides):
    with pytest.raises(ValueError, match=rf"reduction\.{key}="):
        ReductionConfig.from_dict(overrides)


@pytest.mark.parametrize("key", ["restore", "score", "method", "reweight", "aggregate"])
def test_error_lists_the_allowed_values(key):
    with pytest.raises(ValueError) as info:
        ReductionConfig.from_dict({key: "bogus"})
    allowed = {"restore": "residual", "score": "bipartite", "method": "fatr_paper",
               "reweight": "paper", "aggregate": "merge"}[key]  # fmt: skip
    assert allowed in str(info.value) and "bogus" in str(info.value)


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match="keep_ration"):
        ReductionConfig.from_dict(dict(keep_ration=0.5))


def test_layers_beyond_depth_are_rejected():
    assert ReductionConfig.from_dict(dict(layers=(2, 4, 6)), depth=6).layers == (2, 4, 6)
    with pytest.raises(ValueError, match=r"\blayers\b"):
        ReductionConfig.from_dict(dict(layers=(2, 4, 7)), depth=6)
    with pytest.raises(ValueError, match=r"\blayers\b"):
        FATRVisionTransformer(img_size=32, patch_size=8, embed_dims=16, num_layers=4, num_heads=2,
                              reduction=dict(layers=(2, 4, 5)))  # fmt: skip


def test_not_a_dict():
    with pytest.raises(ValueError, match="reduction"):
        ReductionConfig.from_dict([("layers", (4,))])


@pytest.mark.parametrize(
    "key,overrides",
    [
        ("layers", dict(layers=4)),
        ("windows", dict(method="fatr_paper", layers=(4,), keep_ratio=0.7, windows="2")),
        ("keep_ratio", dict(keep_ratio="0.7")),
        ("score", dict(score=3)),
    ],
)
def test_wrong_types_raise_value_error_naming_the_key(key, overrides):
    """A scalar where a sequence is expected (or a string) is a config error, not a TypeError."""
    with pytest.raises(ValueError, match=rf"\b{key}\b"):
        ReductionConfig.from_dict(overrides)

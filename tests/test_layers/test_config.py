"""ReductionConfig: defaults, normalisation, and a ValueError naming the key for every bad value."""

import dataclasses

import pytest

from fatr_seg.layers import REDUCTION_DEFAULTS, FATRVisionTransformer, ReductionConfig


def test_defaults_and_normalisation():
    cfg = ReductionConfig.from_dict({})
    assert cfg.method == "fatr" and cfg.score == "exact" and cfg.restore == "dc"
    assert cfg.layers == (4, 7, 10) and cfg.windows == tuple(REDUCTION_DEFAULTS["windows"])
    assert cfg.keep_ratio == (0.7, 0.7, 0.7)
    assert cfg.reweight == "identity"
    cfg = ReductionConfig.from_dict(dict(layers=[2, 5], keep_ratio=[0.5, 1], windows=[4, 2]))
    assert cfg.layers == (2, 5) and cfg.keep_ratio == (0.5, 1.0) and cfg.windows == (4, 2)
    assert isinstance(cfg.keep_ratio[1], float)
    assert ReductionConfig.from_dict(dict(layers=(3,), keep_ratio=1, windows=(1,))).keep_ratio == (
        1.0,
    )
    assert ReductionConfig.from_dict(None) is None
    assert ReductionConfig.from_dict(cfg) is cfg
    assert ReductionConfig.from_dict(dict(reweight=None)).reweight is None
    assert cfg.index(1) == 0 and cfg.index(4) == 1 and cfg.index(0) is None


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
    ("layers", dict(layers=(), windows=(), keep_ratio=())),
    ("keep_ratio", dict(keep_ratio=0.0)),
    ("keep_ratio", dict(keep_ratio=-0.3)),
    ("keep_ratio", dict(keep_ratio=1.2)),
    ("keep_ratio", dict(keep_ratio=(0.7, 0.7))),  # one per layer, or one for all
    ("keep_ratio", dict(keep_ratio=(0.7, 0.7, 1.5))),
    ("keep_ratio", dict(keep_ratio=float("nan"))),
    ("windows", dict(windows=(2, 1))),  # length must match layers
    ("windows", dict(windows=(2, 2, 1, 1))),
    ("windows", dict(windows=(3, 2, 1))),  # 2 does not divide 3
    ("windows", dict(windows=(1, 2, 2))),  # growing
    ("windows", dict(windows=(2, 0, 0))),
    ("windows", dict(windows=(2, 2.0, 1))),
    ("method", dict(method="dct")),
    ("keep_ratio", dict(method="tome", keep_ratio=0.4)),  # ToMe merges at most half
    ("restore", dict(method="tome", restore="residual")),
    ("score", dict(score="cosine")),
    ("reweight", dict(reweight="none")),
    ("reweight", dict(reweight=True)),
    ("restore", dict(restore="nearest")),
]


@pytest.mark.parametrize("key,overrides", BAD, ids=[f"{k}-{i}" for i, (k, _) in enumerate(BAD)])
def test_invalid_values_raise_naming_the_key(key, overrides):
    with pytest.raises(ValueError, match=rf"\b{key}\b"):
        ReductionConfig.from_dict(overrides)


@pytest.mark.parametrize("key", ["restore", "score", "method", "reweight"])
def test_error_lists_the_allowed_values(key):
    with pytest.raises(ValueError) as info:
        ReductionConfig.from_dict({key: "bogus"})
    allowed = {"restore": "residual", "score": "logit_proxy", "method": "random",
               "reweight": "paper"}[key]  # fmt: skip
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
        ("windows", dict(layers=(4,), keep_ratio=0.7, windows=2)),
        ("keep_ratio", dict(keep_ratio="0.7")),
    ],
)
def test_wrong_types_raise_value_error_naming_the_key(key, overrides):
    """A scalar where a sequence is expected (or a string) is a config error, not a TypeError."""
    with pytest.raises(ValueError, match=rf"\b{key}\b"):
        ReductionConfig.from_dict(overrides)

"""The budget on the command line (``fatr_seg.models.keep_ratio``) and the loading of an unreduced
model's checkpoint into FATR (``fill_reduction_params``, ``UnreducedCheckpointHook``).

References: a model built with a keep ratio is compared with the same weights after
``backbone.set_keep_ratio``; a FATR model completed from an unreduced checkpoint is compared with
that unreduced model itself, at keep ratio 1 (nothing removed, so the identity init must give
the same logits).
"""

from types import SimpleNamespace

import pytest
import torch
from mmengine.config import Config
from mmengine.runner.checkpoint import _load_checkpoint_to_model
from mmseg.registry import MODELS
from tiny_segmentors import IMG, plain_segmentor, randomize_, save_teacher, segmentor_cfg

from fatr_seg.models.convert import fill_reduction_params
from fatr_seg.models.hooks import UnreducedCheckpointHook, describe_keys
from fatr_seg.models.keep_ratio import (
    KeepRatioError,
    format_keep_ratio,
    parse_keep_ratio,
    set_config_keep_ratio,
)


def _config(reduction="default") -> Config:
    return Config(dict(model=dict(type="EncoderDecoder", **segmentor_cfg(reduction))))


def test_parse_keep_ratio_takes_one_budget():
    assert parse_keep_ratio("0.5") == 0.5
    assert parse_keep_ratio(["1"]) == 1.0
    assert parse_keep_ratio(["0.5", "0.6", "0.7"]) == (0.5, 0.6, 0.7)
    assert parse_keep_ratio("0.5,0.6, 0.7") == (0.5, 0.6, 0.7)
    assert format_keep_ratio(0.5) == "0.5" and format_keep_ratio((0.5, 0.25)) == "0.5,0.25"


@pytest.mark.parametrize(
    "text, problem",
    [("abc", "'abc' is not a number"), ("1.5", "1.5 is outside (0, 1]"),
     ("0", "0 is outside"), ("-0.2", "-0.2 is outside"), ("nan", "nan is outside"),
     ("0.5,", "'' is not a number")],
)  # fmt: skip
def test_parse_keep_ratio_names_the_option_and_the_allowed_values(text, problem):
    with pytest.raises(KeepRatioError) as err:
        parse_keep_ratio(text)
    message = str(err.value)
    assert message.startswith(f"--keep-ratio {text}: ") and problem in message
    assert "give a number in (0, 1], or one per reduction layer" in message
    assert "\n" not in message


def test_set_config_keep_ratio_is_building_with_it():
    """The config route equals ``set_keep_ratio`` on the same weights, and changes the output."""
    cfg = _config()
    reference = randomize_(MODELS.build(cfg.model), seed=0).eval()
    x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    metas = [dict(img_shape=(IMG, IMG), ori_shape=(IMG, IMG), pad_shape=(IMG, IMG))] * 2
    with torch.no_grad():
        before = reference.encode_decode(x, metas)
    assert set_config_keep_ratio(cfg, ["0.25", "0.75"], "tiny.py") == (0.25, 0.75)
    assert cfg.model.backbone.reduction.keep_ratio == (0.25, 0.75)
    built = MODELS.build(cfg.model).eval()
    built.load_state_dict(reference.state_dict())
    reference.backbone.set_keep_ratio((0.25, 0.75))
    assert built.backbone.reduction == reference.backbone.reduction
    with torch.no_grad():
        out, expected = built.encode_decode(x, metas), reference.encode_decode(x, metas)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert not torch.allclose(out, before)  # the budget did change what is computed


def test_set_config_keep_ratio_replaces_a_token_count():
    cfg = _config(dict(method="tome", layers=(2, 3), r=3))
    assert set_config_keep_ratio(cfg, 0.6, "tome.py") == (0.6, 0.6)
    assert "r" not in cfg.model.backbone.reduction
    assert MODELS.build(cfg.model).backbone.reduction.keep_ratio == (0.6, 0.6)


def test_set_config_keep_ratio_errors_are_one_line():
    with pytest.raises(
        KeepRatioError,
        match=r"^--keep-ratio 0.5 0.6 0.7: tiny.py reduces at 2 "
        r"layers \(2, 3\); give one number in \(0, 1\] or 2, one per layer$",
    ):
        set_config_keep_ratio(_config(), ["0.5", "0.6", "0.7"], "tiny.py")  # fmt: skip
    with pytest.raises(
        KeepRatioError,
        match=r"^--keep-ratio 0.5: base.py has no token "
        r"reduction \(model.backbone.reduction is None\)",
    ):
        set_config_keep_ratio(_config(None), 0.5, "base.py")  # fmt: skip
    with pytest.raises(KeepRatioError, match="outside"):
        set_config_keep_ratio(_config(), ["2"], "tiny.py")
    with pytest.raises(KeepRatioError, match=r"^--keep-ratio 1.5: tiny.py: reduction.keep_ratio"):
        set_config_keep_ratio(_config(), 1.5, "tiny.py")  # a number from Python, not parsed
    # The method's own rule: ToMe's bipartite matching merges at most half of the tokens.
    with pytest.raises(KeepRatioError, match=r"^--keep-ratio 0.3: tome.py: .*keep_ratio >= 0.5"):
        set_config_keep_ratio(_config(dict(method="tome", layers=(2, 3))), ["0.3"], "tome.py")


def test_unreduced_checkpoint_completes_to_the_same_model(tmp_path):
    """An unreduced checkpoint, completed by the hook, loads strictly into FATR; with nothing
    removed (keep ratio 1) that model gives the unreduced model's logits."""
    teacher = tmp_path / "baseline.pth"
    state = save_teacher(teacher, seed=3)
    checkpoint = torch.load(teacher, weights_only=True)
    model = plain_segmentor()  # FATR at blocks 2 and 3, Segmenter head on the compact tokens
    own = {k: v.clone() for k, v in model.state_dict().items()}
    UnreducedCheckpointHook().after_load_checkpoint(SimpleNamespace(model=model), checkpoint)
    added = sorted(set(checkpoint["state_dict"]) - set(state))
    assert added and all(k.endswith(".attn.omega1") for k in added)
    _load_checkpoint_to_model(model, checkpoint, strict=True)  # nothing missing or unexpected
    for key in added:
        torch.testing.assert_close(model.state_dict()[key], own[key], rtol=0, atol=0)
    unreduced = plain_segmentor(reduction=None, compact_output=False)
    unreduced.load_state_dict(state)
    model.eval(), unreduced.eval()
    model.backbone.set_keep_ratio(1.0)
    x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))
    metas = [dict(img_shape=(IMG, IMG), ori_shape=(IMG, IMG), pad_shape=(IMG, IMG))] * 2
    with torch.no_grad():
        out, expected = model.encode_decode(x, metas), unreduced.encode_decode(x, metas)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_fill_leaves_other_checkpoints_alone():
    model = plain_segmentor()
    own = model.state_dict()
    wrapped = {"module." + k: v for k, v in own.items() if not k.endswith(".attn.omega1")}
    added = fill_reduction_params(own, wrapped, prefix="module.")
    assert added and all("module." + k in wrapped for k in added)
    # A checkpoint that lacks more than the reduction's parameters is mmengine's to report.
    partial = {k: v for k, v in own.items() if "decode_head" not in k and "omega" not in k}
    assert fill_reduction_params(own, partial) == [] and not any("omega" in k for k in partial)
    complete = dict(own)
    assert fill_reduction_params(own, complete) == [] and complete.keys() == own.keys()


def test_describe_keys_is_short():
    keys = [f"backbone.blocks.{i}.attn.omega1" for i in range(4, 12)]
    keys += ["backbone.blocks.3.reducer.dc_pos", "backbone.blocks.6.reducer.dc_pos", "other"]
    assert describe_keys(keys) == ("backbone.blocks.{4..11}.attn.omega1, "
                                   "backbone.blocks.{3,6}.reducer.dc_pos, other")  # fmt: skip

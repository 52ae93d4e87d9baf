"""Checkpoint conversion: timm ViT and mmseg ``VisionTransformer`` -> fatr_seg (timm) keys.

fatr_seg's backbone uses timm's ViT key names, so a timm checkpoint needs only its classifier
dropped. mmseg's ``VisionTransformer`` (and Segmenter checkpoints, which wrap it as
``backbone.*``) use mmcv's ``MultiheadAttention`` / ``FFN`` names; they are renamed here.
mmseg's ``VisionTransformer`` defaults to ``patch_bias=False`` (so do its Segmenter configs); such
a checkpoint gets an explicit zero patch-embedding bias, which computes the same function.
"""

from __future__ import annotations

import math
import os
import re

import torch
import torch.nn.functional as F

__all__ = [
    "FATR_ONLY",
    "CheckpointError",
    "convert_state_dict",
    "detect_format",
    "load_checkpoint_file",
    "load_state_strict",
    "mmseg_vit_to_fatr",
    "resize_pos_embed",
    "save_checkpoint_file",
    "timm_to_fatr",
]

WEIGHTS_HELP = "see README.md, section 'Pretrained weights'"

# mmseg VisionTransformer -> timm names (per block, then the rest).
_MMSEG_BLOCK = [
    (r"ln1\.", "norm1."),
    (r"attn\.attn\.in_proj_weight", "attn.qkv.weight"),
    (r"attn\.attn\.in_proj_bias", "attn.qkv.bias"),
    (r"attn\.attn\.out_proj\.", "attn.proj."),
    (r"ln2\.", "norm2."),
    (r"ffn\.layers\.0\.0\.", "mlp.fc1."),
    (r"ffn\.layers\.1\.", "mlp.fc2."),
]
_TIMM_DROP = ("head.", "fc_norm.", "head_drop.")
#: Key suffixes of the parameters that exist only with a reduction: a plain ViT checkpoint lacks
#: them by design, and they keep their init (``omega1 = omega2 = 0`` and ``dc_pos = 0`` give the
#: unreduced model's attention and DC tokens; see docs/method.md).
FATR_ONLY = (".attn.omega1", ".attn.omega2", ".reducer.dc_pos")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with a message that names the problem."""


def load_checkpoint_file(path: str) -> dict:
    """Read a checkpoint's state dict (accepts ``{'state_dict': ...}``, ``{'model': ...}``).

    ``.safetensors`` files are read with safetensors; anything else with ``torch.load``
    (``weights_only=True``).
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path} ({WEIGHTS_HELP})")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            ckpt = load_file(path, device="cpu")
        else:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load / safetensors raise many types on a bad file
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(err).__name__}: {first}"
        ) from err
    for key in ("state_dict", "model", "module"):
        if isinstance(ckpt, dict) and key in ckpt and isinstance(ckpt[key], dict):
            ckpt = ckpt[key]
            break
    if not isinstance(ckpt, dict) or not ckpt:
        raise CheckpointError(f"{path} holds no state dict ({WEIGHTS_HELP})")
    return ckpt


def save_checkpoint_file(state_dict: dict, path: str) -> None:
    """Write a state dict that :func:`load_checkpoint_file` reads back.

    ``.safetensors``: the flat tensor dict (what the Hugging Face hub stores); anything else:
    ``{'state_dict': ...}`` with ``torch.save`` (what mmengine's checkpoints hold).
    """
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        # safetensors stores neither views sharing memory nor non-contiguous tensors.
        save_file({k: v.detach().contiguous().clone() for k, v in state_dict.items()}, path)
    else:
        torch.save({"state_dict": state_dict}, path)


def detect_format(state_dict: dict) -> str:
    """``'fatr'`` (timm names), ``'mmseg'`` (mmseg VisionTransformer names), or raise."""
    keys = [re.sub(r"^(module\.|backbone\.)", "", k) for k in state_dict]
    if any(k.startswith("blocks.0.attn.qkv.") for k in keys):
        return "fatr"
    if any(k.startswith("layers.0.attn.attn.in_proj_") for k in keys):
        return "mmseg"
    raise CheckpointError(
        "unrecognised checkpoint: expected timm ViT keys (blocks.N.attn.qkv.*) or mmseg "
        f"VisionTransformer keys (layers.N.attn.attn.in_proj_*); first keys: {list(state_dict)[:5]}"
    )


def timm_to_fatr(state_dict: dict) -> dict:
    """Drop a timm ViT's classifier and wrapper prefixes; all other keys are ours already."""
    out = {}
    for k, v in state_dict.items():
        k = re.sub(r"^module\.", "", k)
        if not k.startswith(_TIMM_DROP):
            out[k] = v
    return out


def mmseg_vit_to_fatr(state_dict: dict) -> dict:
    """Rename mmseg ``VisionTransformer`` keys to timm's (``backbone.`` prefix kept if present).

    Keys outside the backbone (e.g. a Segmenter's ``decode_head.*``) pass through unchanged. A
    missing patch-embedding bias (mmseg's ``patch_bias=False``) is added as zeros.
    """
    out = {}
    for key, v in state_dict.items():
        key = re.sub(r"^module\.", "", key)
        prefix = "backbone." if key.startswith("backbone.") else ""
        if prefix == "" and any(k.startswith("backbone.") for k in state_dict):
            out[key] = v  # a segmentor's head or neck
            continue
        k = key[len(prefix) :]
        m = re.match(r"layers\.(\d+)\.(.*)", k)
        if m:
            rest = m.group(2)
            for pat, rep in _MMSEG_BLOCK:
                rest = re.sub("^" + pat, rep, rest)
            k = f"blocks.{m.group(1)}.{rest}"
        elif k.startswith("patch_embed.projection."):
            k = k.replace("patch_embed.projection.", "patch_embed.proj.")
        elif k.startswith("ln1."):
            k = k.replace("ln1.", "norm.")
        out[prefix + k] = v
    # patch_bias=False (mmseg's default): a zero bias is the same function.
    for pre in {k[: -len("patch_embed.proj.weight")] for k in out
                if k.endswith("patch_embed.proj.weight")}:  # fmt: skip
        weight = out[pre + "patch_embed.proj.weight"]
        out.setdefault(pre + "patch_embed.proj.bias", weight.new_zeros(weight.shape[0]))
    return out


def convert_state_dict(state_dict: dict) -> dict:
    """Convert a timm or mmseg ViT state dict to fatr_seg keys (format detected)."""
    fmt = detect_format(state_dict)
    return timm_to_fatr(state_dict) if fmt == "fatr" else mmseg_vit_to_fatr(state_dict)


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int]) -> torch.Tensor:
    """Resize a (1, 1 + h·w, C) square-grid positional embedding to ``new_grid`` (bicubic)."""
    n = pos_embed.shape[1] - 1
    side = math.isqrt(n)
    if side * side != n:
        raise CheckpointError(f"pos_embed with {n} patch positions is not a square grid")
    if (side, side) == tuple(new_grid):
        return pos_embed
    grid = pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False)
    grid = grid.flatten(2).transpose(1, 2).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :1], grid], dim=1)


def load_state_strict(
    module: torch.nn.Module, state: dict, path: str, what: str, optional: tuple[str, ...] = (),
    hint: str = "",
) -> None:  # fmt: skip
    """Load ``state`` into ``module``: every key used, every module key present, shapes equal.

    Args:
        module: The module to load into.
        state: Its state dict, already in the module's key names.
        path: The checkpoint file, for the messages.
        what: What ``module`` is, for the messages (``'this backbone'``, ``'the teacher'``).
        optional: Key suffixes the checkpoint may lack; those parameters keep their init.
        hint: Appended to the message, e.g. which config keys to check.

    Raises:
        CheckpointError: Naming the mismatched, missing or unexpected keys.
    """
    own = module.state_dict()
    wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
             for k, v in state.items() if k in own and v.shape != own[k].shape]  # fmt: skip
    if wrong:
        raise CheckpointError(f"{path} does not match {what}: shape mismatch {wrong[:4]}{hint}")
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(optional)]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{path} does not match {what}: missing {missing[:8]}, "
            f"unexpected {result.unexpected_keys[:8]}{hint}"
        )

"""Checkpoint reading and conversion: timm ViT and mmseg ``VisionTransformer`` -> timm keys.

fatr_seg's backbone uses timm's ViT key names, so a timm checkpoint needs only its classifier
dropped. mmseg's ``VisionTransformer`` (and Segmenter checkpoints, which wrap it as
``backbone.*``) use mmcv's ``MultiheadAttention`` / ``FFN`` names; they are renamed here.
mmseg's ``VisionTransformer`` defaults to ``patch_bias=False`` (so do its Segmenter configs); such
a checkpoint gets an explicit zero patch-embedding bias, which computes the same function.

Checkpoints are read from local ``.pth``/``.safetensors`` files, or through mmengine's
``CheckpointLoader`` from URLs and model-zoo prefixes (``https://``, ``open-mmlab://``,
``torchvision://``, ``mmcls://`` ...).
"""

from __future__ import annotations

import hashlib
import math
import os
import re

import torch

from ..layers.embed import resample_pos_embed

__all__ = [
    "FATR_ONLY",
    "CheckpointError",
    "convert_state_dict",
    "detect_format",
    "fill_reduction_params",
    "is_remote",
    "load_checkpoint_file",
    "load_state_strict",
    "mmseg_name",
    "mmseg_vit_to_fatr",
    "resize_pos_embed",
    "save_checkpoint_file",
    "timm_to_fatr",
]

WEIGHTS_HELP = "see docs/usage.md, section 'Pretrained weights'"

# mmseg VisionTransformer name prefix <-> timm name prefix: inside a block ...
_BLOCK_NAMES = [
    ("ln1.", "norm1."),
    ("attn.attn.in_proj_weight", "attn.qkv.weight"),
    ("attn.attn.in_proj_bias", "attn.qkv.bias"),
    ("attn.attn.out_proj.", "attn.proj."),
    ("ln2.", "norm2."),
    ("ffn.layers.0.0.", "mlp.fc1."),
    ("ffn.layers.1.", "mlp.fc2."),
]
# ... and outside the blocks (``ln1`` is the final norm there).
_TOP_NAMES = [
    ("patch_embed.projection.", "patch_embed.proj."),
    ("ln1.", "norm."),
    ("ln_pre.", "norm_pre."),
]
_TIMM_DROP = ("head.", "fc_norm.", "head_drop.")
#: Key suffixes of the parameters that exist only with a reduction: a plain ViT checkpoint lacks
#: them by design, and they keep their init (``omega1 = omega2 = 0`` and ``dc_pos = 0`` give the
#: unreduced model's attention and DC tokens; see docs/method.md).
FATR_ONLY = (".attn.omega1", ".attn.omega2", ".reducer.dc_pos")


def _rename(key: str, to_timm: bool) -> str:
    """One backbone key (no ``backbone.`` prefix) renamed between mmseg's and timm's names."""
    src, dst = (0, 1) if to_timm else (1, 0)
    blocks = ("layers.", "blocks.") if to_timm else ("blocks.", "layers.")
    m = re.match(re.escape(blocks[0]) + r"(\d+)\.(.*)", key)
    if m:
        rest = m.group(2)
        for pair in _BLOCK_NAMES:
            if rest.startswith(pair[src]):
                rest = pair[dst] + rest[len(pair[src]) :]
                break
        return f"{blocks[1]}{m.group(1)}.{rest}"
    for pair in _TOP_NAMES:
        if key.startswith(pair[src]):
            return pair[dst] + key[len(pair[src]) :]
    return key


def mmseg_name(key: str) -> str:
    """The name mmseg's ``VisionTransformer`` gives the parameter fatr_seg calls ``key``."""
    return _rename(key, to_timm=False)


def is_remote(path: str) -> bool:
    """Whether ``path`` is a URL or a model-zoo prefix (read by mmengine's CheckpointLoader)."""
    return "://" in path


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with a message that names the problem."""


def _first_line(err: Exception) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"


def _download(url: str) -> str:
    """Download ``url`` once into torch hub's checkpoint folder (as mmengine's http loader).

    The file name starts with a hash of the URL: hub URLs of different models often end in the
    same name (``.../model.safetensors``). In a distributed run rank 0 downloads first; the
    others then find the file.
    """
    from mmengine.dist import barrier, get_dist_info

    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    digest = hashlib.sha256(url.encode()).hexdigest()[:12]
    path = os.path.join(folder, f"{digest}_{os.path.basename(url.split('?')[0])}")

    def fetch() -> None:
        if not os.path.isfile(path):
            os.makedirs(folder, exist_ok=True)
            torch.hub.download_url_to_file(url, path, progress=False)

    rank, world_size = get_dist_info()
    if rank == 0:
        fetch()
    if world_size > 1:
        barrier()
    if rank > 0:
        fetch()
    return path


def _read_remote(path: str):
    """Read a checkpoint from a URL or model-zoo prefix; any failure is one CheckpointError."""
    from mmengine.runner import CheckpointLoader

    try:
        if path.startswith(("http://", "https://")) and path.split("?")[0].endswith(".safetensors"):
            # mmengine reads URLs with torch.load, which cannot read safetensors.
            return _read_local(_download(path))
        return CheckpointLoader.load_checkpoint(path, map_location="cpu", logger="current")
    except CheckpointError:
        raise
    except Exception as err:  # urllib, torch.load and the zoo lookups raise many types
        hint = (
            "a model name mmengine's model zoo does not know"
            if isinstance(err, KeyError)
            else "without network access, download it elsewhere and give the local file"
        )
        raise CheckpointError(
            f"cannot load checkpoint {path}: {_first_line(err)} ({hint}; {WEIGHTS_HELP})"
        ) from err


def _read_local(path: str):
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path} ({WEIGHTS_HELP})")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        from .safe_globals import mmengine_safe_globals

        # A Runner checkpoint also holds the message hub's logged values: allow exactly those
        # classes for this read only (torch's process-wide allow-list stays as it is).
        with torch.serialization.safe_globals(mmengine_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load / safetensors raise many types on a bad file
        raise CheckpointError(f"cannot read checkpoint {path}: {_first_line(err)}") from err


def load_checkpoint_file(path: str) -> dict:
    """Read a checkpoint's state dict (accepts ``{'state_dict': ...}``, ``{'model': ...}``).

    Local ``.safetensors`` files are read with safetensors, other local files with
    ``torch.load`` (``weights_only=True``, allowing for this read the message-hub classes an
    mmengine Runner checkpoint holds, :func:`fatr_seg.models.safe_globals.mmengine_safe_globals`).
    URLs and model-zoo prefixes (see :func:`is_remote`) go through mmengine's
    ``CheckpointLoader``, as mmseg's own backbones load them (its http
    loader caches the file under torch hub's folder and unpickles it fully, i.e. trusts the
    source); a ``.safetensors`` URL is downloaded to the same cache and read with safetensors.

    Raises:
        CheckpointError: A missing or unreadable file, a failed download (the message names the
            URL), or a file without a state dict.
    """
    ckpt = _read_remote(path) if is_remote(path) else _read_local(path)
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
        out[prefix + _rename(key[len(prefix) :], to_timm=True)] = v
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


def resize_pos_embed(
    pos_embed: torch.Tensor, new_grid: tuple[int, int], mode: str = "bicubic"
) -> torch.Tensor:
    """Resize a checkpoint's (1, 1 + h·w, C) square-grid positional embedding to ``new_grid``."""
    n = pos_embed.shape[1] - 1
    side = math.isqrt(n)
    if side * side != n:
        raise CheckpointError(f"pos_embed with {n} patch positions is not a square grid")
    out = resample_pos_embed(pos_embed.float(), (side, side), new_grid, mode)
    return out.to(pos_embed.dtype)


def fill_reduction_params(own: dict, state: dict, prefix: str = "") -> list[str]:
    """Complete the checkpoint of an unreduced model with a FATR model's own reduction parameters.

    When ``state`` holds every key of ``own`` but the reduction's own parameters (the keys
    ending in :data:`FATR_ONLY`), it is the unreduced model's: those parameters are added to it
    from ``own`` (the model's current values, its identity init when freshly built), so that
    loading it is complete. Any other checkpoint is left as it is.

    Args:
        own: The FATR model's state dict.
        state: The checkpoint's state dict; keys are ``prefix`` + the model's. Changed in place.
        prefix: E.g. ``'module.'`` for a checkpoint saved from a wrapped model.

    Returns:
        The model keys that were added (empty if none).
    """
    missing = [k for k in own if prefix + k not in state]
    if not missing or not all(k.endswith(FATR_ONLY) for k in missing):
        return []
    for key in missing:
        state[prefix + key] = own[key].detach().clone()
    return missing


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

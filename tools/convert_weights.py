"""Convert a timm ViT or an mmseg ``VisionTransformer``/Segmenter checkpoint to fatr_seg's format.

``python tools/convert_weights.py SRC DST [--format auto|timm|mmseg] [--overwrite]``

fatr_seg's format is timm's ViT key names in ``{'state_dict': ...}``, saved with ``torch.save``,
or as a flat ``.safetensors`` file when DST ends in ``.safetensors``;
``init_cfg=dict(type='Pretrained', checkpoint=DST)`` loads either strictly. SRC may be ``.pth``,
``.pt``, ``.bin`` (``torch.save``) or ``.safetensors``, or a URL / model-zoo prefix such as
``https://download.openmmlab.com/...`` (read by mmengine's ``CheckpointLoader``); a
whole-segmentor checkpoint (``backbone.*`` and ``decode_head.*``) keeps its prefixes, with the
backbone's keys renamed. An existing DST is kept unless ``--overwrite`` is given.

Typical use. timm weights: download them on a machine with internet, then convert::

    python - <<'EOF'
    import timm, torch
    m = timm.create_model('vit_small_patch16_384.augreg_in21k_ft_in1k', pretrained=True)
    torch.save(m.state_dict(), 'vit_small_patch16_384_timm.pth')
    EOF
    python tools/convert_weights.py vit_small_patch16_384_timm.pth \\
        pretrain/vit_small_patch16_384.pth

``pretrain/vit_small_patch16_384.pth`` is what ``configs/fatr_ade20k.py`` expects (ViT-T/B:
``vit_tiny_patch16_384.augreg_in21k_ft_in1k`` / ``vit_base_patch16_384.augreg_in21k_ft_in1k`` to
``pretrain/vit_{tiny,base}_patch16_384.pth``). A timm ``model.safetensors`` from the Hugging Face
hub converts the same way. An mmseg checkpoint::

    python tools/convert_weights.py segmenter_vit-s_mask.pth pretrain/segmenter_vit-s_fatr.pth
"""

import argparse
import os
import os.path as osp
import re
import sys
import warnings

# mmengine and mmcv import pkg_resources (hence setuptools < 81); its deprecation notice is noise.
warnings.filterwarnings("ignore", message="pkg_resources is deprecated")

import torch

from fatr_seg.models.convert import (
    CheckpointError,
    detect_format,
    is_remote,
    load_checkpoint_file,
    mmseg_vit_to_fatr,
    save_checkpoint_file,
    timm_to_fatr,
)

FORMATS = {"timm": "fatr", "mmseg": "mmseg"}  # CLI name -> convert.detect_format's name
SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def convert(src: str, dst: str, fmt: str = "auto", overwrite: bool = False) -> str:
    """Convert ``src`` to fatr_seg's format at ``dst``; returns a one-line summary.

    ``src`` may be a URL or a model-zoo prefix (``https://``, ``open-mmlab://`` ...), read
    through mmengine's ``CheckpointLoader``.

    Raises:
        CheckpointError: ``src`` is missing, unreadable, of an unsupported type, cannot be
            downloaded, or is not a ViT of the requested format; ``dst`` exists and
            ``overwrite`` is False.
    """
    remote = is_remote(src)
    if not remote and not osp.isfile(src):
        raise CheckpointError(f"checkpoint not found: {src}")
    if osp.lexists(dst) and not overwrite:
        raise CheckpointError(f"{dst} exists already: not overwriting it (--overwrite replaces it)")
    if not remote and not src.endswith(SUFFIXES):
        raise CheckpointError(
            f"unsupported checkpoint type {osp.splitext(src)[1] or '(none)'} for {src}: expected "
            f"one of {', '.join(SUFFIXES)} (for timm .npz weights, load them with timm and save "
            "model.state_dict() with torch.save)"
        )
    state = load_checkpoint_file(src)
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    detected = {v: k for k, v in FORMATS.items()}[detect_format(tensors)]
    if fmt != "auto" and fmt != detected:
        raise CheckpointError(f"{src} is not a {fmt} checkpoint: its keys are {detected}'s")
    out = timm_to_fatr(tensors) if detected == "timm" else mmseg_vit_to_fatr(tensors)
    # timm keys keep their names (less a DDP "module." prefix); mmseg keys are all renamed.
    dropped = [k for k in tensors if re.sub(r"^module\.", "", k) not in out]
    dropped = sorted(dropped if detected == "timm" else []) + sorted(set(state) - set(tensors))
    had_bias = any(k.endswith(("patch_embed.projection.bias", "patch_embed.proj.bias"))
                   for k in tensors)  # fmt: skip
    added = [] if had_bias else [k for k in out if k.endswith("patch_embed.proj.bias")]

    os.makedirs(osp.dirname(osp.abspath(dst)), exist_ok=True)
    save_checkpoint_file(out, dst)
    depth = len({m.group(1) for k in out if (m := re.match(r"(?:backbone\.)?blocks\.(\d+)\.", k))})
    summary = (
        f"{detected} ViT ({depth} blocks) -> {dst}: {len(out)} tensors, "
        f"dropped {len(dropped)}{' ' + str(dropped) if dropped else ''}"
    )
    if added:
        summary += f", added {added} (zero patch-embedding bias)"
    return summary


def parse_args():
    parser = argparse.ArgumentParser(
        description="Convert a timm ViT or mmseg VisionTransformer/Segmenter checkpoint to "
        "fatr_seg's format (timm key names, {'state_dict': ...})"
    )
    parser.add_argument("src", help="source checkpoint (.pth/.pt/.bin/.safetensors, or a URL)")
    parser.add_argument("dst", help="output path, e.g. pretrain/vit_small_patch16_384.pth "
                        "(.safetensors: a flat safetensors file)")  # fmt: skip
    parser.add_argument("--format", choices=["auto", *FORMATS], default="auto",
                        help="source key format (default: detected)")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    return parser.parse_args()


def main():
    args = parse_args()
    try:
        print(convert(args.src, args.dst, args.format, args.overwrite))
    except CheckpointError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()

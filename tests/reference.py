"""A naive, explicit reference implementation of FATR, written only for the tests.

Nothing here imports ``fatr_seg``: every quantity is rebuilt from its definition in
``shared/paper.md`` and issue 3, as slowly and plainly as possible, in float64:

* attention builds the full ``A = softmax(q kᵀ · scale + bias)`` and, for the reweighting, the full
  matrix ``Â = A_LP + (1 + ω1) A_HP + (1 + ω2) A_DC``;
* the HF score is the explicit column mean of ``A`` over heads and query rows;
* selection, window assignment, DC aggregation, the source map and restoration are Python loops over
  single images and single tokens.

:func:`vit_forward` runs a whole reduced ViT from a ``state_dict`` (timm key names), one image at a
time, so a batched ``FATRVisionTransformer`` can be compared with it end to end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import torch
import torch.nn.functional as F

DT = torch.float64
NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------
def attention_matrix(q, k, scale, key_bias=None):
    """Explicit ``A = softmax(q kᵀ · scale + key_bias)``: (B, h, n, n) float64 (differentiable)."""
    logits = q.to(DT) @ k.to(DT).transpose(-2, -1) * scale
    if key_bias is not None:
        logits = logits + key_bias.to(DT)[:, None, None, :]
    return logits.softmax(dim=-1)


def valid_keys(key_bias, B, n):
    """(B, n) float64: 1 for keys that take part in attention, 0 for masked (``-inf``) ones."""
    if key_bias is None:
        return torch.ones(B, n, dtype=DT)
    return torch.isfinite(key_bias).to(DT)


def reweighted_matrix(A, num_dc, omega1, omega2, key_bias=None):
    """Explicit ``Â = A_LP + (1 + ω1) A_HP + (1 + ω2) A_DC``, (B, h, n, n) float64.

    ``A_LP = 1 vᵀ / |valid|`` spreads every row uniformly over the keys that take part in attention
    (all keys without a mask; masked empty DC tokens are no tokens at all), ``A_HP = A - A_LP``,
    ``A_DC`` is ``A`` with every column but the last ``num_dc`` (the DC tokens) set to zero.
    ``omega1``, ``omega2``: (h,).
    """
    B, h, n, _ = A.shape
    valid = valid_keys(key_bias, B, n)
    a_lp = (valid / valid.sum(dim=1, keepdim=True))[:, None, None, :].expand(B, h, n, n)
    a_hp = A - a_lp
    dc_cols = torch.zeros(n, dtype=DT)
    dc_cols[n - num_dc :] = 1.0
    a_dc = A * dc_cols
    w1 = omega1.to(DT).view(1, h, 1, 1)
    w2 = omega2.to(DT).view(1, h, 1, 1)
    return a_lp + (1 + w1) * a_hp + (1 + w2) * a_dc


def reweighted_attention(q, k, v, scale, num_dc, omega1, omega2, key_bias=None):
    """``Â V`` from the explicit ``Â``: (B, h, n, d) float64."""
    A = attention_matrix(q, k, scale, key_bias)
    return reweighted_matrix(A, num_dc, omega1, omega2, key_bias) @ v.to(DT)


def column_mean_scores(A, query_valid=None):
    """Explicit HF score of every key: ``1/(h n) Σ_heads Σ_queries A[q, k]``, (B, n) float64.

    ``query_valid`` (B, n) bool leaves query rows out (empty DC tokens); n counts the others.
    """
    B, h, n, _ = A.shape
    if query_valid is None:
        query_valid = torch.ones(B, n, dtype=torch.bool)
    out = torch.zeros(B, n, dtype=DT)
    for b in range(B):
        for head in range(h):
            for row in range(n):
                if query_valid[b, row]:
                    out[b] = out[b] + A[b, head, row]
    return out / (h * query_valid.sum(dim=1, keepdim=True))


# --------------------------------------------------------------------------------------------
# Selection, windows, DC tokens, source map, restoration (one image at a time)
# --------------------------------------------------------------------------------------------
def num_keep(keep_ratio, num_tokens):
    """``ceil(keep_ratio · M)`` in exact rational arithmetic on the ratio's decimal text, ≥ 1.

    The product is rounded to 6 decimals first, the documented rule that makes ``0.7 · 10`` give 7
    whatever the float error: a ratio of ``0.05000000000000001`` keeps 1 of 20, not 2.
    """
    return max(1, min(num_tokens, math.ceil(round(Fraction(str(keep_ratio)) * num_tokens, 6))))


def select(scores, k):
    """Top-k positions of a score list, ties towards the lower position; both lists ascending."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:k]), sorted(order[k:])


def boundary_margin(scores, k):
    """Gap between the k-th and (k+1)-th largest score (inf if nothing is dropped)."""
    s = sorted(scores, reverse=True)
    return math.inf if k >= len(s) else s[k - 1] - s[k]


def window_of(p, hw_shape, w):
    """Window (row-major) of original patch ``p`` on a ``w × w`` split: ``floor(r·w/H)``."""
    H, W = hw_shape
    r, c = divmod(p, W)
    return (r * w // H) * w + (c * w // W)


@dataclass
class ImageState:
    """Bookkeeping of one image's reduced sequence ``[CLS, HF tokens, DC tokens]``."""

    hw_shape: tuple[int, int]
    hf: list[int]  # original index of each HF token, in sequence order
    windows: int = 0  # DC windows per side (0: no DC tokens yet)
    dc_count: list[int] = field(default_factory=list)
    feat_then: dict[int, torch.Tensor] = field(default_factory=dict)  # folded patch -> feature
    dc_then: dict[int, torch.Tensor] = field(default_factory=dict)  # folded patch -> its DC then

    @classmethod
    def initial(cls, hw_shape):
        return cls(tuple(hw_shape), list(range(hw_shape[0] * hw_shape[1])))

    @property
    def num_patches(self):
        return self.hw_shape[0] * self.hw_shape[1]

    def position(self, p):
        """Position (in the sequence without CLS) of the token that represents patch ``p``."""
        if p in self.hf:
            return self.hf.index(p)
        return len(self.hf) + window_of(p, self.hw_shape, self.windows)

    def source(self):
        return [self.position(p) for p in range(self.num_patches)]

    def lf_window(self):
        hf = set(self.hf)
        return [-1 if p in hf else window_of(p, self.hw_shape, self.windows)
                for p in range(self.num_patches)]  # fmt: skip

    def key_bias(self):
        """(n,) 0 / -inf over ``[CLS, HF, DC]``: empty DC windows take no part in attention."""
        bias = [0.0] * (1 + len(self.hf)) + [0.0 if c > 0 else NEG_INF for c in self.dc_count]
        return torch.tensor(bias, dtype=DT)


@dataclass
class FoldResult:
    kept: list[int]  # original indices kept as HF tokens
    kept_scores: list[float]
    folded: list[int]  # original indices folded at this step
    folded_window: list[int]
    margin: float  # score gap at the selection boundary (for near-tie diagnostics)


def fold(x, st, scores, keep, w, dc_pos=None, skip_noop=True):
    """One reduction step on one image.

    With ``skip_noop`` (what a reduction layer does), a step that folds nothing and leaves the DC
    grid as it is returns the sequence untouched; without it (``fold_tokens`` itself) the DC
    tokens are rebuilt anyway (count-weighted mean of themselves, plus ``dc_pos``).

    Args:
        x: (1 + M + D, C) tokens ``[CLS, HF, DC]`` (any float dtype; autograd flows through).
        st: The image's :class:`ImageState` (not modified).
        scores: list of M floats.
        keep: Number of HF tokens to keep.
        w: DC windows per side after this step.
        dc_pos: Optional (w², C) positional term added to every DC token.

    Returns:
        ``(x_new, state_new, FoldResult)``.
    """
    M, D = len(st.hf), len(st.dc_count)
    assert len(scores) == M
    keep_pos, drop_pos = select(scores, keep)
    result = FoldResult(
        kept=[st.hf[i] for i in keep_pos],
        kept_scores=[scores[i] for i in keep_pos],
        folded=[st.hf[i] for i in drop_pos],
        folded_window=[window_of(st.hf[i], st.hw_shape, w) for i in drop_pos],
        margin=boundary_margin(scores, keep),
    )
    if skip_noop and keep == M and (D == 0 or st.windows == w):
        return x, st, result  # nothing to fold and no DC grid to change

    C = x.shape[-1]
    sums = [torch.zeros(C, dtype=x.dtype) for _ in range(w * w)]
    counts = [0] * (w * w)
    # Existing DC tokens: each old window lies inside exactly one new window (nesting). Find it
    # from the patches the old window holds, and fold the old mean in with its count as weight.
    hf_set = set(st.hf)
    for j in range(D):
        if st.dc_count[j] == 0:
            continue
        members = [p for p in range(st.num_patches)
                   if p not in hf_set and window_of(p, st.hw_shape, st.windows) == j]  # fmt: skip
        assert len(members) == st.dc_count[j]
        targets = {window_of(p, st.hw_shape, w) for p in members}
        assert len(targets) == 1, "old DC windows must nest inside new ones"
        jn = targets.pop()
        sums[jn] = sums[jn] + st.dc_count[j] * x[1 + M + j]
        counts[jn] += st.dc_count[j]
    # Newly removed tokens.
    for i in drop_pos:
        jn = window_of(st.hf[i], st.hw_shape, w)
        sums[jn] = sums[jn] + x[1 + i]
        counts[jn] += 1
    dc = []
    for jn in range(w * w):
        val = sums[jn] / counts[jn] if counts[jn] else torch.zeros(C, dtype=x.dtype)
        if dc_pos is not None:
            val = val + dc_pos[jn].to(x.dtype)
        dc.append(val)

    new = ImageState(st.hw_shape, [st.hf[i] for i in keep_pos], w, counts,
                     dict(st.feat_then), dict(st.dc_then))  # fmt: skip
    for i in drop_pos:
        p = st.hf[i]
        new.feat_then[p] = x[1 + i]
        new.dc_then[p] = dc[window_of(p, st.hw_shape, w)]
    x_new = torch.stack([x[0]] + [x[1 + i] for i in keep_pos] + dc)
    return x_new, new, result


def restore(tokens, st, mode="dc"):
    """Tokens (M + D, C) without CLS -> (N, C), one per original patch, by a loop over patches.

    ``'dc'``: HF patches get their token, folded patches their current DC token. ``'residual'``:
    folded patches get ``DC_now + (feature_then - DC_then)``.
    """
    out = []
    for p in range(st.num_patches):
        val = tokens[st.position(p)]
        if mode == "residual" and p not in st.hf:
            val = val + (st.feat_then[p] - st.dc_then[p])
        out.append(val)
    return torch.stack(out)


# --------------------------------------------------------------------------------------------
# A whole ViT, one image at a time
# --------------------------------------------------------------------------------------------
def _linear(x, sd, name):
    out = x @ sd[name + ".weight"].to(DT).T
    if sd.get(name + ".bias") is not None:
        out = out + sd[name + ".bias"].to(DT)
    return out


def _layer_norm(x, sd, name, eps):
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"].to(DT), sd[name + ".bias"].to(DT),
                        eps)  # fmt: skip


@dataclass
class LayerRecord:
    """What one reduction layer did to one image."""

    layer: int  # 1-indexed
    scores: list[float]  # score of each patch token present before the step
    fold: FoldResult
    source: list[int]
    lf_window: list[int]
    dc_count: list[int]


def vit_forward(sd, images, cfg):
    """Reference forward of a (reduced) plain ViT.

    Args:
        sd: ``state_dict`` with timm names (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
            ``blocks.i.{norm1, attn.qkv, attn.proj, attn.omega1/2, reducer.dc_pos, norm2, mlp.fc1,
            mlp.fc2}``, ``norm``).
        images: (B, 3, H, W).
        cfg: dict with ``patch_size``, ``num_heads``, ``num_layers``, ``pos_grid``,
            ``out_indices`` (0-indexed), ``final_norm``, ``norm_eps`` and ``reduction`` (None or a
            dict with every key given: ``layers`` (1-indexed), ``keep_ratio`` (one per layer),
            ``windows``, ``reweight``, ``restore``).

    Returns:
        ``(outs, records)``: one (B, C, H/p, W/p) float64 map per out index, and per image the list
        of :class:`LayerRecord`. Differentiable w.r.t. ``sd`` entries and ``images``.
    """
    p, heads, depth = cfg["patch_size"], cfg["num_heads"], cfg["num_layers"]
    red = cfg["reduction"]
    layers = tuple(red["layers"]) if red else ()
    outs = {i: [] for i in cfg["out_indices"]}
    records = []
    for b in range(images.shape[0]):
        img = images[b : b + 1].to(DT)
        pad_h, pad_w = (-img.shape[2]) % p, (-img.shape[3]) % p
        img = F.pad(img, (0, pad_w, 0, pad_h))
        grid = F.conv2d(img, sd["patch_embed.proj.weight"].to(DT),
                        sd["patch_embed.proj.bias"].to(DT), stride=p)  # fmt: skip
        H, W = grid.shape[-2:]
        C = grid.shape[1]
        tokens = grid[0].reshape(C, H * W).T  # (N, C), row-major
        pos = sd["pos_embed"].to(DT)
        if (H, W) != tuple(cfg["pos_grid"]):
            gp = pos[:, 1:].reshape(1, *cfg["pos_grid"], C).permute(0, 3, 1, 2)
            gp = F.interpolate(gp, size=(H, W), mode="bicubic", align_corners=False)
            pos = torch.cat([pos[:, :1], gp.flatten(2).transpose(1, 2)], dim=1)
        x = torch.cat([sd["cls_token"].to(DT)[0], tokens]) + pos[0]
        st = ImageState.initial((H, W))
        recs = []
        for i in range(depth):
            pre = f"blocks.{i}."
            n = x.shape[0]
            D = len(st.dc_count)
            bias = st.key_bias()[None]
            hdim = C // heads
            qkv = _linear(_layer_norm(x, sd, pre + "norm1", 1e-6), sd, pre + "attn.qkv")
            q, k, v = qkv.reshape(n, 3, heads, hdim).permute(1, 2, 0, 3)[:, None]  # (1,h,n,d)
            A = attention_matrix(q, k, hdim**-0.5, bias)
            if red and red["reweight"] is not None and i >= layers[0]:
                Ahat = reweighted_matrix(A, D, sd[pre + "attn.omega1"], sd[pre + "attn.omega2"],
                                         bias)  # fmt: skip
            else:
                Ahat = A
            y = (Ahat @ v.to(DT))[0].transpose(0, 1).reshape(n, C)
            y = _linear(y, sd, pre + "attn.proj")
            if pre + "ls1.gamma" in sd:
                y = y * sd[pre + "ls1.gamma"].to(DT)
            x = x + y
            if i + 1 in layers:
                j = layers.index(i + 1)
                M = len(st.hf)
                scores = column_mean_scores(A, torch.isfinite(bias))[0, 1 : 1 + M].tolist()
                keep = num_keep(red["keep_ratio"][j], M)
                x, st, res = fold(x, st, scores, keep, red["windows"][j],
                                  sd[pre + "reducer.dc_pos"].to(DT))  # fmt: skip
                recs.append(LayerRecord(i + 1, scores, res, st.source(), st.lf_window(),
                                        list(st.dc_count)))  # fmt: skip
            hid = F.gelu(_linear(_layer_norm(x, sd, pre + "norm2", 1e-6), sd, pre + "mlp.fc1"))
            y = _linear(hid, sd, pre + "mlp.fc2")
            if pre + "ls2.gamma" in sd:
                y = y * sd[pre + "ls2.gamma"].to(DT)
            x = x + y
            if i in outs:
                full = restore(x[1:], st, red["restore"] if red else "dc")  # (N, C)
                if i == depth - 1 and cfg["final_norm"]:
                    full = _layer_norm(full, sd, "norm", cfg["norm_eps"])
                outs[i].append(full.T.reshape(C, H, W))
        records.append(recs)
    return [torch.stack(outs[i]) for i in sorted(outs)], records


# --------------------------------------------------------------------------------------------
# Test utility
# --------------------------------------------------------------------------------------------
def randomize_(model, seed):
    """Give a ViT weights far from its init: non-uniform attention (so HF scores are well apart),
    non-zero ω and DC positional terms, a residual stream that stays O(1) so fp32 stays within
    1e-5 of the fp64 reference. Deterministic in ``seed``; returns ``model``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith(("omega1", "omega2", "dc_pos", "cls_token", "pos_embed")):
                p.copy_(0.5 * noise)
            elif "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * noise)
            elif p.dim() >= 2:
                branch = name.endswith(("attn.proj.weight", "mlp.fc2.weight"))
                p.copy_(noise * (0.5 if branch else 1.0) / math.sqrt(p[0].numel()))
            else:
                p.copy_(0.1 * noise)
    return model

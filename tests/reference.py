"""A naive, explicit reference implementation of FATR, written only for the tests.

Nothing here imports ``fatr_seg``: every quantity is rebuilt from its definition in
``shared/paper.md``, as slowly and plainly as possible, in float64:

* attention builds the full ``A = softmax(q kᵀ · scale + bias)`` and, for the reweighting, the full
  matrix ``Â = A_LP + (1 + ω1) A_HP + (1 + ω2) A_DC``;
* the HF score is the explicit column mean of ``A`` over heads and query rows; the peers' scores
  (logit proxy, CLS attention, ToMe's bipartite matching, ALGM's 2x2 windows) are loops too;
* selection, merging into kept tokens, DC windows, EViT's fusion, the residual, the source map and
  restoration are Python loops over single images and single tokens, each token carrying the list
  of original patches it stands for.

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
# Scores (one image at a time, plain loops)
# --------------------------------------------------------------------------------------------
def proxy_scores(q, k, scale, query_valid):
    """Logit proxy ``mean_h (Σ_{valid q} q) · k · scale`` per key of one image: list of n floats.

    ``q``, ``k``: (h, n, d); ``query_valid``: list of n bools (empty DC tokens vote no query).
    """
    h, n, d = q.shape
    out = []
    for key in range(n):
        total = 0.0
        for head in range(h):
            qs = sum(q[head, row].to(DT) for row in range(n) if query_valid[row])
            total += float(qs @ k[head, key].to(DT)) * scale
        out.append(total / h)
    return out


def cls_scores(A):
    """EViT's attentiveness of one image: row 0 of A (h, n, n) averaged over heads."""
    h = A.shape[0]
    return [float(sum(A[head, 0, key] for head in range(h)) / h) for key in range(A.shape[-1])]


def cosine(a, b):
    a, b = a.detach().to(DT), b.detach().to(DT)  # similarities choose indices only
    return float(a @ b / (a.norm().clamp_min(1e-12) * b.norm().clamp_min(1e-12)))


def bipartite(metric):
    """ToMe's split as its code does it, for M patch tokens of one image.

    The sequence ``[CLS, patches]`` alternates into A (even positions) and B (odd): patch ``i``
    is in A when ``i + 1`` is even. Each A patch gets its most similar B patch (first on ties)
    and the score ``-similarity``; B patches score ``+inf`` and are their own partner.

    Returns:
        ``(scores, partner)`` lists of M.
    """
    M = metric.shape[0]
    b_set = [i for i in range(M) if (i + 1) % 2 == 1]
    scores, partner = [math.inf] * M, list(range(M))
    for i in range(M):
        if (i + 1) % 2 == 0 and b_set:
            sims = [cosine(metric[i], metric[j]) for j in b_set]
            best = max(range(len(b_set)), key=lambda t: (sims[t], -t))
            scores[i], partner[i] = -sims[best], b_set[best]
    return scores, partner


def protected_bipartite(metric, priority, num_protected):
    """FATR + ToMe: the ``num_protected`` tokens of highest priority (ties to the lower
    position) stay as they are; the others, in sequence order, alternate B, A, B, A, ... and
    every A token gets its most similar B token (first on ties) and the score ``-similarity``.
    Protected and B tokens score ``+inf`` and are their own partner.
    """
    M = metric.shape[0]
    ranked = sorted(range(M), key=lambda i: (-priority[i], i))
    protected = set(ranked[:num_protected])
    free = [i for i in range(M) if i not in protected]
    b_set, a_set = free[0::2], free[1::2]
    scores, partner = [math.inf] * M, list(range(M))
    for i in a_set:
        sims = [cosine(metric[i], metric[j]) for j in b_set]
        best = max(range(len(b_set)), key=lambda t: (sims[t], -t))
        scores[i], partner[i] = -sims[best], b_set[best]
    return scores, partner


def windows2x2(metric, hw_shape):
    """ALGM's local windows on an unreduced grid: scores and partners (lists of N).

    Full 2x2 windows only; a window's similarity is the mean cosine over its 12 ordered pairs of
    distinct tokens; its bottom-right token is the partner of the other three (score ``-sim``),
    and scores ``+inf`` like every token outside a full window.
    """
    H, W = hw_shape
    N = H * W
    scores, partner, sim_of = [math.inf] * N, list(range(N)), {}
    for wr in range(H // 2):
        for wc in range(W // 2):
            cells = [(2 * wr + a) * W + 2 * wc + b for a in (0, 1) for b in (0, 1)]
            pair = [cosine(metric[i], metric[j]) for i in cells for j in cells if i != j]
            sim = sum(pair) / len(pair)
            for c in cells[:3]:
                scores[c], partner[c] = -sim, cells[3]
            sim_of[cells[3]] = sim
    return scores, partner, sim_of


def window_hf_fold(hf, hw_shape, window, num_folded):
    """FATR's early local stage on an unreduced grid: scores, partners and the priority margin.

    Whole ``window × window`` windows, row-major; a window's priority is the highest HF score
    of its tokens. The ``num_folded`` lowest-priority windows (ties to the lower window) fold:
    their members but the last score the window's rank and join the last (bottom-right) one;
    every other token scores ``+inf``. The margin is the priority gap at the fold boundary.
    """
    H, W = hw_shape
    N = H * W
    wins = [[(window * wr + a) * W + window * wc + b for a in range(window) for b in range(window)]
            for wr in range(H // window) for wc in range(W // window)]  # fmt: skip
    prio = [max(hf[c] for c in cells) for cells in wins]
    order = sorted(range(len(wins)), key=lambda g: (prio[g], g))
    scores, partner = [math.inf] * N, list(range(N))
    for rank, g in enumerate(order):
        for c in wins[g][:-1]:
            scores[c], partner[c] = float(rank), wins[g][-1]
    ranked = [prio[g] for g in order]
    inside = 0 < num_folded < len(wins)
    margin = ranked[num_folded] - ranked[num_folded - 1] if inside else math.inf
    return scores, partner, margin


# --------------------------------------------------------------------------------------------
# Selection, aggregation, source map, restoration (one image at a time)
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


def window_of(p, hw_shape, grid):
    """DC window (row-major) of original patch ``p``: ``grid`` is ``('side', w)`` (``w × w``
    windows, ``floor(r·w/H)``) or ``('size', s)`` (``s × s`` patches, ``floor(r/s)``). An int is
    ``('side', w)``."""
    kind, w = grid if isinstance(grid, tuple) else ("side", grid)
    H, W = hw_shape
    r, c = divmod(p, W)
    if kind == "side":
        return (r * w // H) * w + (c * w // W)
    return (r // w) * (-(-W // w)) + c // w


def num_windows(hw_shape, grid):
    kind, w = grid if isinstance(grid, tuple) else ("side", grid)
    return w * w if kind == "side" else (-(-hw_shape[0] // w)) * (-(-hw_shape[1] // w))


@dataclass
class Tok:
    """One token of the sequence without CLS: what it stands for."""

    cell: int  # grid index of a patch token (-1: EViT's fused token); window id of a DC token
    members: list[int]  # original patches it represents
    size: float  # weight in size-weighted means (patches it stands for)


@dataclass
class ImageState:
    """Bookkeeping of one image's reduced sequence ``[CLS, patch tokens, DC tokens]``."""

    hw_shape: tuple[int, int]
    patches: list[Tok]
    dc: list[Tok] = field(default_factory=list)
    dc_grid: tuple | None = None
    sized: bool = False  # patch sizes tracked (after a merge): log(size) enters attention
    prop_attn: bool = True
    resid: dict[int, torch.Tensor] = field(default_factory=dict)  # patch -> residual

    @classmethod
    def initial(cls, hw_shape):
        N = hw_shape[0] * hw_shape[1]
        return cls(tuple(hw_shape), [Tok(p, [p], 1.0) for p in range(N)])

    @property
    def num_patches(self):
        return self.hw_shape[0] * self.hw_shape[1]

    @property
    def hf(self):
        """Grid index of every patch token, in sequence order."""
        return [t.cell for t in self.patches]

    @property
    def dc_count(self):
        return [t.size for t in self.dc]

    def tokens(self):
        return self.patches + self.dc

    def position(self, p):
        """Position (in the sequence without CLS) of the token that represents patch ``p``."""
        hits = [i for i, t in enumerate(self.tokens()) if p in t.members]
        assert len(hits) == 1, (p, hits)
        return hits[0]

    def source(self):
        return [self.position(p) for p in range(self.num_patches)]

    def key_bias(self):
        """(n,) over ``[CLS, patches, DC]``: ``log(size)`` on patch tokens with proportional
        attention, ``-inf`` on empty DC windows, 0 elsewhere."""
        pb = [math.log(t.size) if (self.sized and self.prop_attn) else 0.0 for t in self.patches]
        db = [0.0 if t.size > 0 else NEG_INF for t in self.dc]
        return torch.tensor([0.0] + pb + db, dtype=DT)


@dataclass
class StepResult:
    kept: list[int]  # grid indices of the kept patch tokens, in their new sequence order
    kept_scores: list[float]
    folded: list[int]  # grid indices of the dropped tokens
    margin: float  # score gap at the selection boundary (for near-tie diagnostics)


def reduce_step(x, st, scores, keep, aggregate, grid=None, dc_pos=None, partner=None,
                metric=None, radius=None, weights=None, kept_order=None, prop_attn=True,
                skip_noop=True):  # fmt: skip
    """One reduction step on one image, by loops.

    Args:
        x: (1 + M + D, C) tokens ``[CLS, patches, DC]`` (any float dtype; autograd flows).
        st: The image's :class:`ImageState` (not modified).
        scores: list of M floats; the top ``keep`` stay (ties to the lower position).
        aggregate: ``'dc'``, ``'merge'`` or ``'fuse'``.
        grid: DC windows after the step (``'dc'``).
        dc_pos: (windows, C) or (1, C) positional term of the DC tokens (``'dc'``).
        partner: list of M: for ``'merge'``, the position each dropped token joins (else the
            most similar kept token by ``metric`` (M, d), within ``radius`` when one is).
        weights: list of M fusion weights (``'fuse'``).
        kept_order: key function of a kept position: the order of the kept tokens in the new
            sequence (default: ascending position).
        prop_attn: Proportional attention after a merge.
        skip_noop: A step that drops nothing and leaves the DC grid as it is does nothing.

    Returns:
        ``(x_new, state_new, StepResult)``.
    """
    M, D = len(st.patches), len(st.dc)
    assert len(scores) == M
    keep_pos, drop_pos = select(scores, keep)
    if kept_order is not None:
        keep_pos = sorted(keep_pos, key=kept_order)
    result = StepResult(
        [st.patches[i].cell for i in keep_pos],
        [scores[i] for i in keep_pos],
        [st.patches[i].cell for i in drop_pos],
        boundary_margin(scores, keep),
    )
    if skip_noop and keep == M and (aggregate != "dc" or D == 0 or st.dc_grid == grid):
        return x, st, result
    C = x.shape[-1]
    old_tokens = st.tokens()
    new = ImageState(st.hw_shape, [], [], st.dc_grid, st.sized, st.prop_attn, dict(st.resid))
    rows = [x[0]]
    if aggregate == "merge":
        dst = {}
        for i in drop_pos:
            if partner is not None:
                dst[i] = partner[i]
                continue
            best, best_val = None, -math.inf
            for j in keep_pos:
                val = cosine(metric[i], metric[j])
                if radius is not None:
                    pi, pj = st.patches[i].cell, st.patches[j].cell
                    H, W = st.hw_shape
                    near = (
                        pi >= 0
                        and pj >= 0
                        and max(abs(pi // W - pj // W), abs(pi % W - pj % W)) <= radius
                    )
                    val = val - (0.0 if near else 3.0)
                if val > best_val:
                    best, best_val = j, val
            dst[i] = best
        for j in keep_pos:
            group = [j] + [i for i in drop_pos if dst[i] == j]
            size = sum(st.patches[i].size for i in group)
            val = sum(st.patches[i].size * x[1 + i] for i in group) / size
            members = sorted(p for i in group for p in st.patches[i].members)
            new.patches.append(Tok(st.patches[j].cell, members, size))
            rows.append(val)
        new.sized, new.prop_attn = True, prop_attn
        new.dc = list(st.dc)
        rows += [x[1 + M + j] for j in range(D)]
    elif aggregate == "fuse":
        for j in keep_pos:
            new.patches.append(st.patches[j])
            rows.append(x[1 + j])
        fused = sum(weights[i] * x[1 + i] for i in drop_pos)
        members = sorted(p for i in drop_pos for p in st.patches[i].members)
        new.patches.append(Tok(-1, members, sum(st.patches[i].size for i in drop_pos)))
        rows.append(fused)
        new.dc = list(st.dc)
        rows += [x[1 + M + j] for j in range(D)]
    else:
        for j in keep_pos:
            new.patches.append(st.patches[j])
            rows.append(x[1 + j])
        nw = num_windows(st.hw_shape, grid)
        sums = [torch.zeros(C, dtype=x.dtype) for _ in range(nw)]
        counts = [0.0] * nw
        members = [[] for _ in range(nw)]
        # Existing DC tokens: each old window lies inside exactly one new window (nesting).
        for t, j in zip(st.dc, range(D)):
            targets = {window_of(p, st.hw_shape, grid) for p in t.members}
            assert len(targets) <= 1, "old DC windows must nest inside new ones"
            if not targets:
                continue
            jn = targets.pop()
            sums[jn] = sums[jn] + t.size * x[1 + M + j]
            counts[jn] += t.size
            members[jn] += t.members
        for i in drop_pos:
            jn = window_of(st.patches[i].cell, st.hw_shape, grid)
            sums[jn] = sums[jn] + st.patches[i].size * x[1 + i]
            counts[jn] += st.patches[i].size
            members[jn] += st.patches[i].members
        for jn in range(nw):
            val = sums[jn] / counts[jn] if counts[jn] else torch.zeros(C, dtype=x.dtype)
            if dc_pos is not None:
                val = val + dc_pos[jn if dc_pos.shape[0] > 1 else 0].to(x.dtype)
            new.dc.append(Tok(jn, sorted(members[jn]), counts[jn]))
            rows.append(val)
        new.dc_grid = grid
    x_new = torch.stack(rows)
    # Residual: each patch adds (its token before the step) - (its token after the step).
    new_tokens = new.tokens()
    for p in range(st.num_patches):
        before = x[1 + [i for i, t in enumerate(old_tokens) if p in t.members][0]]
        after = x_new[1 + [i for i, t in enumerate(new_tokens) if p in t.members][0]]
        new.resid[p] = new.resid.get(p, 0) + (before - after)
    return x_new, new, result


def restore(tokens, st, mode="copy"):
    """Tokens (M + D, C) without CLS -> (N, C), one per original patch, by a loop over patches.

    ``'copy'``: every patch gets the token that represents it. ``'residual'``: plus its
    accumulated residual.
    """
    out = []
    for p in range(st.num_patches):
        val = tokens[st.position(p)]
        if mode == "residual" and p in st.resid:
            val = val + st.resid[p]
        out.append(val)
    return torch.stack(out)


def bipartite_order(M):
    """ToMe's order of the kept tokens: unmerged A patches, then B patches, each ascending."""
    return lambda i: ((i + 1) % 2, i)


def window_order(sim_of, absorbed):
    """ALGM's order after local merging: windows that merged, most similar first, then the rest
    ascending."""
    return lambda i: (0, -sim_of[i], i) if i in absorbed else (1, 0.0, i)


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
    step: StepResult
    source: list[int]
    dc_count: list[float]


def _layer_keep(red, j, M, hw_shape=None):
    if red.get("keep_ratio") is not None:
        keep = num_keep(red["keep_ratio"][j], M)
    else:
        keep = max(1, M - red["r"][j])
    if red["score"][j] == "window_hf":  # whole windows: the removed count rounds down
        w = red["local_window"]
        folded = min((hw_shape[0] // w) * (hw_shape[1] // w), (M - keep) // (w * w - 1))
        return M - folded * (w * w - 1)
    if red["score"][j] in ("bipartite", "hf_bipartite", "random_bipartite"):
        keep = max(keep, M - M // 2)
    return keep


def _num_protected(red, M, keep):
    """Protected tokens: ceil(protect·M), but no more than leave A tokens of which at most 4 in
    5 have to merge to drop M − keep; none if even no protection leaves that."""
    if red["protect"] <= 0:
        return 0
    protected = num_keep(red["protect"], M)
    while protected > 0 and 4 * ((M - protected) // 2) < 5 * (M - keep):
        protected -= 1
    return protected


def _layer_grid(red, j):
    if red["aggregate"][j] != "dc":
        return None
    if red.get("windows") is not None:
        return ("side", red["windows"][j])
    return ("size", red["window_size"][j])


def vit_forward(sd, images, cfg):
    """Reference forward of a (reduced) plain ViT.

    Args:
        sd: ``state_dict`` with timm names (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
            ``blocks.i.{norm1, attn.qkv, attn.proj, attn.omega1/2, reducer.dc_pos, norm2, mlp.fc1,
            mlp.fc2}``, ``norm``). ``attn.omega2`` holds ``1 + ω2`` (fatr_seg's storage).
        images: (B, 3, H, W).
        cfg: dict with ``patch_size``, ``num_heads``, ``num_layers``, ``pos_grid``,
            ``out_indices`` (0-indexed), ``final_norm``, ``norm_eps`` and ``reduction``: None or
            a dict with every key of fatr_seg's ``ReductionConfig`` given one per layer
            (``dataclasses.asdict`` of one): ``layers`` (1-indexed), ``keep_ratio`` or ``r``,
            ``score``, ``aggregate``, ``windows`` or ``window_size``, ``metric``,
            ``merge_radius``, ``protect``, ``prop_attn``, ``reweight``, ``restore``. Not
            ``'random'``.

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
            D = len(st.dc)
            bias = st.key_bias()[None]
            hdim = C // heads
            scale = hdim**-0.5
            qkv = _linear(_layer_norm(x, sd, pre + "norm1", 1e-6), sd, pre + "attn.qkv")
            q, k, v = qkv.reshape(n, 3, heads, hdim).permute(1, 2, 0, 3)[:, None]  # (1,h,n,d)
            A = attention_matrix(q, k, scale, bias)
            if red and red["reweight"] is not None and i >= layers[0]:
                w2 = sd.get(pre + "attn.omega2")
                w2 = torch.zeros(heads, dtype=DT) if w2 is None else w2.to(DT) - 1
                Ahat = reweighted_matrix(A, D, sd[pre + "attn.omega1"], w2, bias)
            else:
                Ahat = A
            y = (Ahat @ v.to(DT))[0].transpose(0, 1).reshape(n, C)
            y = _linear(y, sd, pre + "attn.proj")
            if pre + "ls1.gamma" in sd:
                y = y * sd[pre + "ls1.gamma"].to(DT)
            x = x + y
            if i + 1 in layers:
                j = layers.index(i + 1)
                M = len(st.patches)
                kind = red["score"][j]
                valid = torch.isfinite(bias)
                metric = (k[0].to(DT).mean(0)[1 : 1 + M] if red["metric"] == "keys"
                          else x[1 : 1 + M].detach())  # fmt: skip
                partner = weights = order = None
                if kind == "hf":
                    scores = column_mean_scores(A, valid)[0, 1 : 1 + M].tolist()
                elif kind == "hf_bipartite":
                    hf = column_mean_scores(A, valid)[0, 1 : 1 + M].tolist()
                    scores, partner = protected_bipartite(
                        metric, hf, _num_protected(red, M, _layer_keep(red, j, M))
                    )
                elif kind == "hf_proxy":
                    scores = proxy_scores(q[0], k[0], scale, valid[0].tolist())[1 : 1 + M]
                elif kind == "cls":
                    scores = weights = cls_scores(A[0])[1 : 1 + M]
                elif kind == "bipartite":
                    scores, partner = bipartite(metric)
                    order = bipartite_order(M)
                elif kind == "window":
                    scores, partner, sim_of = windows2x2(metric, (H, W))
                elif kind == "window_hf":
                    hf = column_mean_scores(A, valid)[0, 1 : 1 + M].tolist()
                    w = red["local_window"]
                    folded = (M - _layer_keep(red, j, M, (H, W))) // (w * w - 1)
                    scores, partner, prio_margin = window_hf_fold(hf, (H, W), w, folded)
                else:
                    raise ValueError(f"the reference has no score {kind!r}")
                keep = _layer_keep(red, j, M, (H, W))
                if kind == "window":
                    _, drop = select(scores, keep)
                    order = window_order(sim_of, {partner[d] for d in drop})
                dc_pos = sd.get(pre + "reducer.dc_pos")
                x, st, res = reduce_step(
                    x, st, scores, keep, red["aggregate"][j], grid=_layer_grid(red, j),
                    dc_pos=None if dc_pos is None else dc_pos.to(DT), partner=partner,
                    metric=metric, radius=red["merge_radius"], weights=weights,
                    kept_order=order, prop_attn=red["prop_attn"],
                )  # fmt: skip
                if kind == "window_hf":  # the ranks never tie: the priorities may
                    res.margin = min(res.margin, prio_margin)
                recs.append(LayerRecord(i + 1, scores, res, st.source(), st.dc_count))
            hid = F.gelu(_linear(_layer_norm(x, sd, pre + "norm2", 1e-6), sd, pre + "mlp.fc1"))
            y = _linear(hid, sd, pre + "mlp.fc2")
            if pre + "ls2.gamma" in sd:
                y = y * sd[pre + "ls2.gamma"].to(DT)
            x = x + y
            if i in outs:
                full = restore(x[1:], st, red["restore"] if red else "copy")  # (N, C)
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

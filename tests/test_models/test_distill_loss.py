"""The distillation losses against float64 references written with explicit loops.

The reference works on the *label* grid: every labelled pixel takes the logits of the head-grid
cell it lies in (nearest upsampling), and the per-pixel terms are averaged over the labelled
pixels. The implementation works on the head grid with fractional weights; the two must agree.
"""

import math

import pytest
import torch
from torch.testing import assert_close

from fatr_seg.models.distill_loss import feature_distill_loss, kl_distill_loss, valid_weights

IGNORE = 255


def make_case(seed=0, B=2, K=5, h=4, w=3, scale=2):
    gen = torch.Generator().manual_seed(seed)
    student = 3 * torch.randn(B, K, h, w, generator=gen, dtype=torch.float64)
    teacher = 3 * torch.randn(B, K, h, w, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, K, (B, 1, h * scale, w * scale), generator=gen)
    void = torch.rand(labels.shape, generator=gen) < 0.3
    labels[void] = IGNORE
    labels[0, 0, :scale, :scale] = IGNORE  # one cell entirely void
    return student, teacher, labels


def softmax(values):
    m = max(values)
    e = [math.exp(v - m) for v in values]
    return [x / sum(e) for x in e]


def reference_kl(student, teacher, labels, T):
    """``T² · mean over labelled pixels of Σ_c p_t (log p_t - log p_s)``, pixel by pixel."""
    B, K, h, w = student.shape
    H, W = labels.shape[-2:]
    total, count = 0.0, 0
    for b in range(B):
        for y in range(H):
            for x in range(W):
                if labels[b, 0, y, x] == IGNORE:
                    continue
                i, j = y * h // H, x * w // W
                p_s = softmax([student[b, c, i, j].item() / T for c in range(K)])
                p_t = softmax([teacher[b, c, i, j].item() / T for c in range(K)])
                total += sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s))
                count += 1
    return T * T * total / count


@pytest.mark.parametrize("T", [1.0, 2.5])
def test_kl_matches_pixel_loop_reference(T):
    student, teacher, labels = make_case()
    weights = valid_weights(labels, student.shape[2:], IGNORE).double()
    got = kl_distill_loss(student, teacher, weights, T)
    assert got.dtype == torch.float64
    assert_close(got, torch.tensor(reference_kl(student, teacher, labels, T), dtype=torch.float64),
                 rtol=1e-12, atol=1e-12)  # fmt: skip


def test_kl_gradient_is_T_times_probability_difference():
    """d loss / d z_s = T · (p_s - p_t) · (labelled pixels of the cell) / (labelled pixels)."""
    T = 2.0
    student, teacher, labels = make_case(seed=1)
    student.requires_grad_(True)
    weights = valid_weights(labels, student.shape[2:], IGNORE).double()
    kl_distill_loss(student, teacher, weights, T).backward()
    B, K, h, w = student.shape
    H, W = labels.shape[-2:]
    pixels = torch.zeros(B, h, w, dtype=torch.float64)
    for b in range(B):
        for y in range(H):
            for x in range(W):
                pixels[b, y * h // H, x * w // W] += float(labels[b, 0, y, x] != IGNORE)
    expected = torch.zeros_like(student)
    for b in range(B):
        for i in range(h):
            for j in range(w):
                p_s = softmax([student[b, c, i, j].item() / T for c in range(K)])
                p_t = softmax([teacher[b, c, i, j].item() / T for c in range(K)])
                for c in range(K):
                    expected[b, c, i, j] = T * (p_s[c] - p_t[c]) * pixels[b, i, j]
    assert_close(student.grad, expected / pixels.sum(), rtol=1e-10, atol=1e-12)


def test_kl_is_zero_for_equal_logits_and_without_labels():
    student, _, labels = make_case(seed=2)
    weights = valid_weights(labels, student.shape[2:], IGNORE).double()
    assert_close(kl_distill_loss(student, student.clone(), weights, 3.0),
                 torch.zeros((), dtype=torch.float64), atol=1e-14, rtol=0)  # fmt: skip
    # Nothing labelled: a zero that still back-propagates (every parameter gets a gradient).
    student.requires_grad_(True)
    empty = torch.zeros_like(weights)
    loss = kl_distill_loss(student, student.detach() + 1, empty, 1.0)
    loss.backward()
    assert loss.item() == 0.0 and student.grad is not None and torch.isfinite(student.grad).all()


def test_kl_of_low_precision_logits_is_float32():
    student, teacher, labels = make_case(seed=3)
    weights = valid_weights(labels, student.shape[2:], IGNORE)
    got = kl_distill_loss(student.bfloat16(), teacher.bfloat16(), weights, 1.0)
    assert got.dtype == torch.float32
    ref = reference_kl(student.bfloat16().double(), teacher.bfloat16().double(), labels, 1.0)
    assert_close(got.double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_valid_weights_are_fractions_of_labelled_pixels():
    labels = torch.full((1, 1, 4, 6), 3)
    labels[0, 0, 0, 0] = IGNORE  # cell (0, 0) of the 2x3 grid: 3 of 4 pixels labelled
    labels[0, 0, 2:, 4:] = IGNORE  # cell (1, 2): none labelled
    expected = torch.tensor([[[0.75, 1.0, 1.0], [1.0, 1.0, 0.0]]])
    assert_close(valid_weights(labels, (2, 3), IGNORE), expected, rtol=0, atol=0)
    assert_close(valid_weights(labels[:, 0], (2, 3), IGNORE), expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_feature_loss_matches_reference(kind):
    gen = torch.Generator().manual_seed(4)
    s = torch.randn(2, 6, 4, 3, generator=gen, dtype=torch.float64)
    t = torch.randn(2, 6, 4, 3, generator=gen, dtype=torch.float64)
    weights = torch.rand(2, 4, 3, generator=gen, dtype=torch.float64)
    total = norm = 0.0
    for b in range(2):
        for i in range(4):
            for j in range(3):
                u, v = s[b, :, i, j].tolist(), t[b, :, i, j].tolist()
                if kind == "mse":
                    d = sum((a - c) ** 2 for a, c in zip(u, v)) / len(u)
                else:
                    dot = sum(a * c for a, c in zip(u, v))
                    d = 1 - dot / math.sqrt(sum(a * a for a in u) * sum(c * c for c in v))
                total += weights[b, i, j].item() * d
                norm += weights[b, i, j].item()
    got = feature_distill_loss(s, t, weights, kind)
    assert_close(got, torch.tensor(total / norm, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_feature_loss_rejects_an_unknown_kind():
    x = torch.zeros(1, 2, 2, 2)
    with pytest.raises(ValueError, match=r"feat_distill_type='l1' is invalid.*'mse', 'cosine'"):
        feature_distill_loss(x, x, torch.ones(1, 2, 2), "l1")

"""Relation-based losses against float64 loop references, plus their invariances."""

import itertools
import math

import pytest
import torch

from hf_distill import losses

DTYPE = torch.float64


# ----------------------------------------------------------------------------------------------
# MiniLMv2 attention relations
# ----------------------------------------------------------------------------------------------


def relation_row(x, b, r, q, heads, valid):
    """softmax over valid keys k of <x_q, x_k> / sqrt(d_r) on relation head r (lists, math)."""
    d_r = x.shape[-1] // heads
    sl = slice(r * d_r, (r + 1) * d_r)
    xq = x[b, q, sl].tolist()
    scores = []
    for k in valid:
        xk = x[b, k, sl].tolist()
        scores.append(sum(a * c for a, c in zip(xq, xk)) / math.sqrt(d_r))
    top = max(scores)
    e = [math.exp(v - top) for v in scores]
    return [v / sum(e) for v in e]


def relation_reference(student_qkv, teacher_qkv, heads, attention_mask, num_items=None):
    b_size, length = attention_mask.shape
    total, count = 0.0, 0
    for b in range(b_size):
        valid = [i for i in range(length) if attention_mask[b, i]]
        for q in valid:
            count += 1
            for x_s, x_t in zip(student_qkv, teacher_qkv):
                acc = 0.0
                for r in range(heads):
                    rs = relation_row(x_s, b, r, q, heads, valid)
                    rt = relation_row(x_t, b, r, q, heads, valid)
                    acc += sum(pt * math.log(pt / ps) for pt, ps in zip(rt, rs) if pt > 0)
                total += acc / heads
    return total / (num_items or count)


def qkv(seed, width, b=2, length=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, length, width, generator=g, dtype=DTYPE) for _ in range(3)]


def test_attention_relation_matches_reference_with_different_widths():
    am = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    student, teacher = qkv(0, 8), qkv(1, 12)
    got = losses.attention_relation_loss(student, teacher, relation_heads=4, attention_mask=am)
    assert got.item() == pytest.approx(relation_reference(student, teacher, 4, am), rel=1e-10)
    got = losses.attention_relation_loss(student, teacher, relation_heads=2, attention_mask=am, num_items=20)
    assert got.item() == pytest.approx(relation_reference(student, teacher, 2, am, num_items=20), rel=1e-10)
    # without a mask every position counts
    full = torch.ones(2, 5, dtype=torch.long)
    assert losses.attention_relation_loss(student, teacher, relation_heads=4).item() == pytest.approx(
        relation_reference(student, teacher, 4, full), rel=1e-10)


def test_attention_relation_accepts_per_head_layout():
    student, teacher = qkv(2, 8), qkv(3, 12)
    # (B, heads, L, d_head) with 2 student heads of 4 and 3 teacher heads of 4
    s4 = [x.reshape(2, 5, 2, 4).transpose(1, 2) for x in student]
    t4 = [x.reshape(2, 5, 3, 4).transpose(1, 2) for x in teacher]
    a = losses.attention_relation_loss(student, teacher, relation_heads=4)
    assert torch.allclose(losses.attention_relation_loss(s4, t4, relation_heads=4), a, rtol=1e-12)


def test_attention_relation_properties():
    am = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    student, teacher = qkv(4, 8), qkv(5, 8)
    assert losses.attention_relation_loss(student, [x.clone() for x in student], relation_heads=2,
                                          attention_mask=am).item() == pytest.approx(0.0, abs=1e-14)
    assert losses.attention_relation_loss(student, teacher, relation_heads=2, attention_mask=am).item() > 1e-3
    # relations are invariant to an orthogonal change of basis within each relation head
    rotation = torch.linalg.qr(torch.randn(4, 4, dtype=DTYPE))[0]
    rotated = [torch.cat([x[..., :4] @ rotation, x[..., 4:] @ rotation], -1) for x in student]
    assert losses.attention_relation_loss(student, rotated, relation_heads=2,
                                          attention_mask=am).item() == pytest.approx(0.0, abs=1e-12)
    # padding holds garbage: value and gradient of real positions unchanged
    s = [x.clone().requires_grad_(True) for x in student]
    clean = losses.attention_relation_loss(s, teacher, relation_heads=2, attention_mask=am)
    g_clean = torch.autograd.grad(clean, s)
    pad = ~am.bool()
    s2 = [x.detach().clone() for x in student]
    t2 = [x.clone() for x in teacher]
    for x in s2:
        x[pad] = float("nan")
    for x in t2:
        x[pad] = 1e30
    s2 = [x.requires_grad_(True) for x in s2]
    dirty = losses.attention_relation_loss(s2, t2, relation_heads=2, attention_mask=am)
    g = torch.autograd.grad(dirty, s2)
    assert torch.equal(clean, dirty)
    for a, c in zip(g, g_clean):
        assert torch.equal(a[~pad], c[~pad]) and torch.count_nonzero(a[pad]) == 0


def test_attention_relation_errors():
    student, teacher = qkv(6, 8), qkv(7, 12)
    with pytest.raises(ValueError, match=r"width 12 is not divisible by relation_heads=8"):
        losses.attention_relation_loss(student, teacher, relation_heads=8)
    with pytest.raises(ValueError, match="same"):
        losses.attention_relation_loss(student[:2], teacher, relation_heads=4)
    with pytest.raises(ValueError, match="positive integer"):
        losses.attention_relation_loss(student, teacher, relation_heads=0)


def test_gradcheck_attention_relation():
    am = torch.tensor([[1, 1, 0], [1, 1, 1]])
    student = [x.requires_grad_(True) for x in qkv(8, 4, length=3)]
    teacher = qkv(9, 6, length=3)
    assert torch.autograd.gradcheck(
        lambda *xs: losses.attention_relation_loss(xs, teacher, relation_heads=2, attention_mask=am), tuple(student))


# ----------------------------------------------------------------------------------------------
# Sample relations
# ----------------------------------------------------------------------------------------------


def huber(x):
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def dist(a, b):
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))


def rkd_distance_reference(s, t):
    n = len(s)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    mu_s = sum(dist(s[i], s[j]) for i, j in pairs) / len(pairs)
    mu_t = sum(dist(t[i], t[j]) for i, j in pairs) / len(pairs)
    return sum(huber(dist(s[i], s[j]) / mu_s - dist(t[i], t[j]) / mu_t) for i, j in pairs) / len(pairs)


def cos_angle(x, i, j, k):
    e1 = [a - b for a, b in zip(x[i], x[j])]
    e2 = [a - b for a, b in zip(x[k], x[j])]
    return sum(a * b for a, b in zip(e1, e2)) / (math.sqrt(sum(a * a for a in e1)) * math.sqrt(sum(b * b for b in e2)))


def rkd_angle_reference(s, t):
    triplets = list(itertools.permutations(range(len(s)), 3))
    return sum(huber(cos_angle(s, i, j, k) - cos_angle(t, i, j, k)) for i, j, k in triplets) / len(triplets)


def sp_reference(s, t):
    n = len(s)

    def normalised_gram(x):
        g = [[sum(a * b for a, b in zip(x[i], x[j])) for j in range(n)] for i in range(n)]
        return [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in g]

    gs, gt = normalised_gram(s), normalised_gram(t)
    return sum((gs[i][j] - gt[i][j]) ** 2 for i in range(n) for j in range(n)) / n**2


def pooled(seed, n=6, d_s=5, d_t=9, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d_s, generator=g, dtype=DTYPE) * scale,
            torch.randn(n, d_t, generator=g, dtype=DTYPE) * scale)


SAMPLE_LOSSES = {
    "rkd_distance": (losses.rkd_distance_loss, rkd_distance_reference),
    "rkd_angle": (losses.rkd_angle_loss, rkd_angle_reference),
    "similarity_preserving": (losses.similarity_preserving_loss, sp_reference),
}


@pytest.mark.parametrize("name", sorted(SAMPLE_LOSSES))
@pytest.mark.parametrize("scale", [0.3, 4.0])  # small and large differences: both Huber branches
def test_sample_relation_losses_match_reference(name, scale):
    fn, ref = SAMPLE_LOSSES[name]
    s, t = pooled(0, scale=scale)
    if name == "rkd_distance":  # make some normalised distances differ by more than 1
        s = s.clone()
        s[0] *= 8
    assert fn(s, t).item() == pytest.approx(ref(s.tolist(), t.tolist()), rel=1e-10)


@pytest.mark.parametrize("name", sorted(SAMPLE_LOSSES))
def test_sample_relation_losses_properties(name):
    fn, ref = SAMPLE_LOSSES[name]
    s, t = pooled(1)
    assert fn(s, s.clone()).item() == pytest.approx(0.0, abs=1e-14)
    assert fn(s, t).item() > 1e-4
    # relations survive an orthogonal transform and a different width (zero padding of features)
    rotation = torch.linalg.qr(torch.randn(5, 5, dtype=DTYPE))[0]
    wider = torch.cat([s @ rotation, torch.zeros(6, 3, dtype=DTYPE)], -1)
    assert fn(s, wider).item() == pytest.approx(0.0, abs=1e-12)
    if name != "similarity_preserving":  # RKD is also invariant to scale and translation
        assert fn(s, 3.0 * s + 1.5).item() == pytest.approx(0.0, abs=1e-12)
    # the mask selects samples; the other rows may hold garbage
    mask = torch.tensor([True, False, True, True, False, True])
    expected = fn(s[mask], t[mask])
    s2, t2 = s.clone(), t.clone()
    s2[~mask] = float("nan")
    t2[~mask] = float("inf")
    assert torch.equal(fn(s2, t2, mask=mask), expected)
    # extra feature dimensions are flattened
    assert torch.allclose(fn(s.reshape(6, 5, 1), t.reshape(6, 3, 3)), fn(s, t))
    x = s.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: fn(a, t), (x,))


def test_sample_relation_losses_degenerate_batches():
    s, t = pooled(2, n=2)
    assert losses.rkd_angle_loss(s, t).item() == 0.0  # fewer than 3 samples: no triplet
    assert losses.rkd_distance_loss(s[:1], t[:1]).item() == 0.0
    # duplicate samples: finite value and gradient
    s = torch.cat([s, s[:1]]).requires_grad_(True)
    t = torch.cat([t, t[:1]])
    for fn in (losses.rkd_distance_loss, losses.rkd_angle_loss, losses.similarity_preserving_loss):
        value = fn(s, t)
        (g,) = torch.autograd.grad(value, s)
        assert torch.isfinite(value) and torch.isfinite(g).all()
    with pytest.raises(ValueError, match="batch"):
        losses.rkd_distance_loss(torch.randn(4, 3), torch.randn(5, 3))

"""Feature-based losses: projections, layer maps, hidden-state and attention-map transfer."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hf_distill import losses

DTYPE = torch.float64


# ----------------------------------------------------------------------------------------------
# Projection
# ----------------------------------------------------------------------------------------------


def test_projection_is_a_linear_layer_with_documented_inits():
    torch.manual_seed(0)
    proj = losses.make_projection(64, 256)
    assert isinstance(proj, nn.Linear) and isinstance(proj, losses.LinearProjection)
    assert proj.weight.shape == (256, 64) and proj.student_dim == 64 and proj.teacher_dim == 256
    bound = math.sqrt(6.0 / (64 + 256))
    assert proj.weight.abs().max().item() <= bound
    assert proj.weight.abs().max().item() > 0.9 * bound  # uniform over the full range
    assert torch.count_nonzero(proj.bias) == 0
    eye = losses.make_projection(3, 5, init="identity")
    x = torch.randn(2, 3)
    assert torch.equal(eye(x)[:, :3], x) and torch.count_nonzero(eye(x)[:, 3:]) == 0
    normal = losses.LinearProjection(256, 512, init="normal")
    assert normal.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert losses.make_projection(4, 6, bias=False).bias is None
    proj.reset_parameters()  # keeps the chosen init
    assert proj.weight.abs().max().item() <= bound
    with pytest.raises(ValueError, match="init"):
        losses.make_projection(4, 6, init="kaiming")


def test_projection_gradient_reaches_its_parameters_and_the_student():
    proj = losses.make_projection(4, 6)
    h_s = torch.randn(2, 3, 4, requires_grad=True)
    h_t = torch.randn(2, 3, 6)
    loss = losses.hidden_mse_loss(proj(h_s), h_t)
    loss.backward()
    assert proj.weight.grad is not None and proj.bias.grad is not None and h_s.grad is not None


def test_width_mismatch_without_projection_is_rejected():
    with pytest.raises(ValueError, match="projection"):
        losses.hidden_mse_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 6))


# ----------------------------------------------------------------------------------------------
# Layer maps
# ----------------------------------------------------------------------------------------------


def test_uniform_layer_map():
    assert losses.layer_map(4, 12) == {0: 0, 1: 3, 2: 6, 3: 9, 4: 12}
    assert losses.layer_map(6, 12, include_embeddings=False) == {i: 2 * i for i in range(1, 7)}
    assert losses.layer_map(2, 2) == {0: 0, 1: 1, 2: 2}
    # not divisible: floor(i * T / S), last student layer still reads the last teacher layer
    assert losses.layer_map(3, 8) == {0: 0, 1: 2, 2: 5, 3: 8}
    # attentions tuple (0-based, no embeddings): TinyBERT's teacher layer i*k + k - 1
    assert losses.attention_layer_map(4, 12) == {0: 2, 1: 5, 2: 8, 3: 11}
    with pytest.raises(ValueError, match="positive"):
        losses.layer_map(0, 12)


def test_validate_layer_map():
    assert losses.validate_layer_map({1: 3, 2: 6}, 2, 6) == {1: 3, 2: 6}
    assert losses.validate_layer_map({"0": "0", "2": "-1"}, 2, 6) == {0: 0, 2: 6}
    assert losses.validate_layer_map([(0, 0), (-1, -1)], 3, 12) == {0: 0, 3: 12}
    assert losses.validate_layer_map({0: 11}, 4, 12, kind="attentions") == {0: 11}
    with pytest.raises(ValueError, match=r"teacher layer 13 is out of range.*12 layers.*0 \(embeddings\) to 12"):
        losses.validate_layer_map({1: 13}, 2, 12)
    with pytest.raises(ValueError, match=r"student layer 3 is out of range.*2 layers"):
        losses.validate_layer_map({3: 6}, 2, 12)
    with pytest.raises(ValueError, match="out of range"):
        losses.validate_layer_map({0: 12}, 4, 12, kind="attentions")
    with pytest.raises(ValueError, match="mapped twice"):
        losses.validate_layer_map([(1, 2), (1, 3)], 2, 12)
    with pytest.raises(ValueError, match="not an integer"):
        losses.validate_layer_map({"one": 2}, 2, 12)
    with pytest.raises(ValueError, match="empty"):
        losses.validate_layer_map({}, 2, 12)


def test_hidden_states_loss_sums_mapped_pairs_with_projections():
    torch.manual_seed(1)
    student = [torch.randn(2, 3, 4, dtype=DTYPE) for _ in range(3)]
    teacher = [torch.randn(2, 3, 6, dtype=DTYPE) for _ in range(7)]
    mapping = losses.layer_map(2, 6)
    projections = losses.make_projections(mapping, 4, 6).double()
    mask = torch.tensor([[True, True, False], [True, False, False]])
    got = losses.hidden_states_loss(student, teacher, mapping, projections=projections, mask=mask)
    expected = sum(
        losses.hidden_mse_loss(projections[str(s)](student[s]), teacher[t], mask=mask) for s, t in mapping.items()
    )
    assert torch.allclose(got, expected)
    shared = losses.make_projection(4, 6).double()
    got = losses.hidden_states_loss(student, teacher, {1: 3}, loss="cosine", projections=shared)
    assert torch.allclose(got, losses.cosine_loss(shared(student[1]), teacher[3]))


@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), 1e30])
def test_hidden_losses_ignore_padding_in_value_and_gradient(garbage):
    torch.manual_seed(2)
    h_s = torch.randn(2, 4, 5, dtype=DTYPE, requires_grad=True)
    h_t = torch.randn(2, 4, 5, dtype=DTYPE)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    for fn in (losses.hidden_mse_loss, losses.cosine_loss):
        clean = fn(h_s, h_t, mask=mask)
        (g_clean,) = torch.autograd.grad(clean, h_s)
        dirty_s = h_s.detach().clone()
        dirty_s[~mask] = garbage
        dirty_s.requires_grad_(True)
        dirty_t = h_t.clone()
        dirty_t[~mask] = garbage
        dirty = fn(dirty_s, dirty_t, mask=mask)
        (g,) = torch.autograd.grad(dirty, dirty_s)
        assert torch.equal(clean, dirty)
        assert torch.equal(g[mask], g_clean[mask]) and torch.count_nonzero(g[~mask]) == 0


# ----------------------------------------------------------------------------------------------
# Attention maps
# ----------------------------------------------------------------------------------------------


def attention_inputs(seed=0, b=2, h=3, length=5):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, h, length, length, generator=g, dtype=DTYPE)
    t = torch.randn(b, h, length, length, generator=g, dtype=DTYPE)
    attention_mask = torch.ones(b, length, dtype=torch.long)
    attention_mask[0, 3:] = 0
    attention_mask[1, 4:] = 0
    return s, t, attention_mask


def mse_reference(s, t, attention_mask, threshold=-100.0):
    b, h, lq, lk = s.shape
    total, count = 0.0, 0
    for bi in range(b):
        valid = [i for i in range(lq) if attention_mask[bi, i]]
        for q in valid:
            acc = 0.0
            for hi in range(h):
                for k in valid:
                    a, c = s[bi, hi, q, k].item(), t[bi, hi, q, k].item()
                    a = 0.0 if a <= threshold else a
                    c = 0.0 if c <= threshold else c
                    acc += (a - c) ** 2
            total += acc / (h * len(valid))
            count += 1
    return total / count


def kl_reference(p_s, p_t, attention_mask):
    b, h, lq, lk = p_s.shape
    total, count = 0.0, 0
    for bi in range(b):
        valid = [i for i in range(lq) if attention_mask[bi, i]]
        for q in valid:
            acc = 0.0
            for hi in range(h):
                for k in valid:
                    pt, ps = p_t[bi, hi, q, k].item(), p_s[bi, hi, q, k].item()
                    if pt > 0:
                        acc += pt * math.log(pt / ps)
            total += acc / h
            count += 1
    return total / count


def softmax_valid_keys(scores, attention_mask):
    """Probabilities with padding keys at -inf (what a masked model returns)."""
    keys = attention_mask.bool()[:, None, None, :]
    return torch.softmax(scores.masked_fill(~keys, float("-inf")), -1)


def test_attention_mse_matches_reference_and_tinybert_without_padding():
    s, t, am = attention_inputs()
    # masked scores as a real model gives them: -inf / finfo.min at padding keys, causal -inf inside
    s_masked = s.masked_fill(~am.bool()[:, None, None, :], float("-inf"))
    t_masked = t.masked_fill(~am.bool()[:, None, None, :], torch.finfo(DTYPE).min)
    causal = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    s_masked = s_masked.masked_fill(causal, float("-inf"))
    t_masked = t_masked.masked_fill(causal, -1e4)
    got = losses.attention_mse_loss(s_masked, t_masked, attention_mask=am)
    assert got.item() == pytest.approx(mse_reference(s_masked, t_masked, am), rel=1e-12)
    # no padding, no masked scores: exactly F.mse_loss (TinyBERT)
    assert losses.attention_mse_loss(s, t).item() == pytest.approx(F.mse_loss(s, t).item(), rel=1e-12)
    # probabilities work too
    p_s, p_t = softmax_valid_keys(s, am), softmax_valid_keys(t, am)
    got = losses.attention_mse_loss(p_s, p_t, attention_mask=am, num_items=20)
    assert got.item() == pytest.approx(mse_reference(p_s, p_t, am) * 7 / 20, rel=1e-12)


def test_attention_kl_matches_reference_for_probs_and_scores():
    s, t, am = attention_inputs(seed=1)
    p_s, p_t = softmax_valid_keys(s, am), softmax_valid_keys(t, am)
    ref = kl_reference(p_s, p_t, am)
    assert losses.attention_kl_loss(p_s, p_t, attention_mask=am).item() == pytest.approx(ref, rel=1e-10)
    assert losses.attention_kl_loss(s, t, attention_mask=am, inputs="scores").item() == pytest.approx(ref, rel=1e-10)


def test_attention_losses_zero_iff_identical_and_padding_invariant():
    s, t, am = attention_inputs(seed=2)
    p_s, p_t = softmax_valid_keys(s, am), softmax_valid_keys(t, am)
    cases = {
        "mse": lambda a, b: losses.attention_mse_loss(a, b, attention_mask=am),
        "kl_scores": lambda a, b: losses.attention_kl_loss(a, b, attention_mask=am, inputs="scores"),
    }
    for name, fn in cases.items():
        assert fn(s, s.clone()).item() == 0.0, name
        assert fn(s, t).item() > 1e-3, name
    assert losses.attention_kl_loss(p_s, p_s.clone(), attention_mask=am).item() == 0.0
    assert losses.attention_kl_loss(p_s, p_t, attention_mask=am).item() > 1e-3
    # garbage in padded rows and columns changes nothing, in value or gradient
    pad = ~(am.bool()[:, None, :, None] & am.bool()[:, None, None, :]).expand_as(s)
    for name, (a, b) in {"mse": (s, t), "kl_scores": (s, t), "kl_probs": (p_s, p_t)}.items():
        fn = cases.get(name) or (lambda x, y: losses.attention_kl_loss(x, y, attention_mask=am))
        a = a.clone().requires_grad_(True)
        clean = fn(a, b)
        (g_clean,) = torch.autograd.grad(clean, a)
        a2 = a.detach().clone()
        a2[pad] = float("nan")
        a2.requires_grad_(True)
        b2 = b.clone()
        b2[pad] = 1e30
        dirty = fn(a2, b2)
        (g,) = torch.autograd.grad(dirty, a2)
        assert torch.equal(clean, dirty), name
        assert torch.equal(g[~pad], g_clean[~pad]) and torch.count_nonzero(g[pad]) == 0, name


def test_attention_cross_attention_masks():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 2, 3, 4, generator=g, dtype=DTYPE)
    t = torch.randn(2, 2, 3, 4, generator=g, dtype=DTYPE)
    qm = torch.tensor([[1, 1, 0], [1, 1, 1]])
    km = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    got = losses.attention_mse_loss(s, t, attention_mask=(qm, km))
    total, count = 0.0, 0
    for b in range(2):
        keys = [k for k in range(4) if km[b, k]]
        for q in range(3):
            if qm[b, q]:
                squares = [(s[b, h, q, k] - t[b, h, q, k]).item() ** 2 for h in range(2) for k in keys]
                total += sum(squares) / (2 * len(keys))
                count += 1
    assert got.item() == pytest.approx(total / count, rel=1e-12)
    with pytest.raises(ValueError, match="query_mask, key_mask"):
        losses.attention_mse_loss(s, t, attention_mask=qm)


def test_attention_head_count_mismatch_is_a_clear_error():
    s = torch.randn(1, 4, 3, 3)
    t = torch.randn(1, 12, 3, 3)
    for fn in (losses.attention_mse_loss, losses.attention_kl_loss):
        with pytest.raises(ValueError, match=r"head counts differ \(student 4, teacher 12\).*attention_relation_loss"):
            fn(s, t)
    with pytest.raises(ValueError, match="batch, heads, query_len, key_len"):
        losses.attention_mse_loss(torch.randn(3, 3), torch.randn(3, 3))


def test_gradcheck_feature_losses():
    s, t, am = attention_inputs(seed=4, b=2, h=2, length=3)
    am[0, 2] = 0
    p_t = softmax_valid_keys(t, am)
    p_s = softmax_valid_keys(s, am).requires_grad_(True)
    s = s.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: losses.attention_mse_loss(x, t, attention_mask=am), (s,))
    assert torch.autograd.gradcheck(
        lambda x: losses.attention_kl_loss(x, t, attention_mask=am, inputs="scores"), (s,))
    assert torch.autograd.gradcheck(lambda x: losses.attention_kl_loss(x, p_t, attention_mask=am), (p_s,))
    h_s = torch.randn(2, 3, 4, dtype=DTYPE, requires_grad=True)
    h_t = torch.randn(2, 3, 4, dtype=DTYPE)
    mask = am.bool()
    assert torch.autograd.gradcheck(lambda x: losses.hidden_mse_loss(x, h_t, mask=mask), (h_s,))
    assert torch.autograd.gradcheck(lambda x: losses.cosine_loss(x, h_t, mask=mask), (h_s,))

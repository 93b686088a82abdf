"""Response-based losses against straightforward float64 references written here with loops."""

import math

import pytest
import torch

from hf_distill import losses

DTYPE = torch.float64


# ----------------------------------------------------------------------------------------------
# Independent references: plain Python loops over rows and classes, math.exp / math.log.
# ----------------------------------------------------------------------------------------------


def softmax_row(row, temperature):
    z = [v / temperature for v in row]
    top = max(z)
    e = [math.exp(v - top) for v in z]
    total = sum(e)
    return [v / total for v in e]


def kl_row(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def jsd_row(p_s, p_t, beta):
    m = [beta * t + (1 - beta) * s for s, t in zip(p_s, p_t)]
    return beta * kl_row(p_t, m) + (1 - beta) * kl_row(p_s, m)


def reference(student, teacher, row_fn, temperature=1.0, mask=None, num_items=None):
    """sum over selected rows of T^2 * row_fn(p_S, p_T), divided by num_items (default: row count)."""
    s_rows = student.reshape(-1, student.shape[-1]).tolist()
    t_rows = teacher.reshape(-1, teacher.shape[-1]).tolist()
    keep = [True] * len(s_rows) if mask is None else mask.reshape(-1).tolist()
    total, count = 0.0, 0
    for s, t, k in zip(s_rows, t_rows, keep):
        if k:
            total += temperature**2 * row_fn(softmax_row(s, temperature), softmax_row(t, temperature))
            count += 1
    return total / max(num_items if num_items is not None else count, 1)


def fwd_kl(p_s, p_t):
    return kl_row(p_t, p_s)


def rev_kl(p_s, p_t):
    return kl_row(p_s, p_t)


def make_inputs(shape=(3, 4, 9), seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(shape, generator=g, dtype=DTYPE) * scale).requires_grad_(True)
    t = torch.randn(shape, generator=g, dtype=DTYPE) * scale
    mask = torch.rand(shape[:-1], generator=g) > 0.3
    mask.view(-1)[0] = True
    return s, t, mask


# ----------------------------------------------------------------------------------------------
# Values against the references
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("use_mask", [False, True])
def test_forward_and_reverse_kl_match_reference(temperature, use_mask):
    s, t, mask = make_inputs()
    mask = mask if use_mask else None
    got = losses.kl_div_loss(s, t, temperature=temperature, mask=mask)
    assert got.item() == pytest.approx(reference(s, t, fwd_kl, temperature, mask), rel=1e-12)
    got = losses.reverse_kl_loss(s, t, temperature=temperature, mask=mask)
    assert got.item() == pytest.approx(reference(s, t, rev_kl, temperature, mask), rel=1e-12)
    assert got.dtype == DTYPE


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_jsd_matches_reference(beta, temperature):
    s, t, mask = make_inputs(seed=1)
    ref = reference(s, t, lambda ps, pt: jsd_row(ps, pt, beta), temperature, mask, num_items=17)
    got = losses.generalized_jsd_loss(s, t, beta=beta, temperature=temperature, mask=mask, num_items=17)
    assert got.item() == pytest.approx(ref, rel=1e-12)


def test_jsd_endpoints_are_exactly_the_two_kls():
    s, t, mask = make_inputs(seed=2)
    for temperature in (1.0, 2.0):
        kw = dict(temperature=temperature, mask=mask, num_items=11)
        assert torch.equal(losses.generalized_jsd_loss(s, t, beta=0.0, **kw), losses.kl_div_loss(s, t, **kw))
        assert torch.equal(losses.generalized_jsd_loss(s, t, beta=1.0, **kw), losses.reverse_kl_loss(s, t, **kw))
        assert losses.generalized_jsd_loss(s, t, beta=0, **kw).item() == pytest.approx(
            reference(s, t, fwd_kl, temperature, mask, 11), rel=1e-12)
        assert losses.generalized_jsd_loss(s, t, beta=1, **kw).item() == pytest.approx(
            reference(s, t, rev_kl, temperature, mask, 11), rel=1e-12)


def test_jsd_near_endpoints_scales_like_the_documented_limits():
    # JSD_beta / beta -> forward KL as beta -> 0 and JSD_beta / (1 - beta) -> reverse KL as beta -> 1.
    s, t, _ = make_inputs(seed=3, scale=1.0)
    eps = 1e-6
    fwd = losses.kl_div_loss(s, t).item()
    rev = losses.reverse_kl_loss(s, t).item()
    assert losses.generalized_jsd_loss(s, t, beta=eps).item() / eps == pytest.approx(fwd, rel=1e-4)
    assert losses.generalized_jsd_loss(s, t, beta=1 - eps).item() / eps == pytest.approx(rev, rel=1e-4)


@pytest.mark.parametrize("beta", [0.05, 0.5, 0.8])
def test_jsd_is_bounded_even_for_extreme_logits(beta):
    s, t, _ = make_inputs(seed=4, scale=60.0)  # near one-hot, nearly disjoint distributions
    temperature = 1.5
    bound = temperature**2 * (-beta * math.log(beta) - (1 - beta) * math.log(1 - beta))
    for dtype in (torch.float32, DTYPE):
        value = losses.generalized_jsd_loss(s.to(dtype), t.to(dtype), beta=beta, temperature=temperature).item()
        assert 0.0 <= value <= bound * (1 + 1e-5)
    # disjoint one-hot distributions reach the bound
    a = torch.tensor([[100.0, -100.0]], dtype=DTYPE)
    b = torch.tensor([[-100.0, 100.0]], dtype=DTYPE)
    assert losses.generalized_jsd_loss(a, b, beta=beta).item() == pytest.approx(bound / temperature**2, rel=1e-9)


def test_temperature_factor_and_num_items():
    s, t, mask = make_inputs(seed=5)
    base = losses.reverse_kl_loss(s, t, temperature=2.0, mask=mask)
    n = int(mask.sum())
    assert losses.reverse_kl_loss(s, t, temperature=2.0, mask=mask, num_items=3 * n).item() == pytest.approx(
        base.item() / 3, rel=1e-12)
    # T^2 factor: the KL at T of logits x equals T^2 times the KL at T=1 of logits x / T.
    assert base.item() == pytest.approx(
        4 * losses.reverse_kl_loss(s / 2, t / 2, mask=mask).item(), rel=1e-12)


# ----------------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------------


def all_divergences(s, t, mask=None):
    log_p_t = torch.log_softmax(t.detach() / 2.0, -1)
    values, indices = log_p_t.topk(3, dim=-1)
    return {
        "kl": losses.kl_div_loss(s, t, temperature=2.0, mask=mask),
        "reverse_kl": losses.reverse_kl_loss(s, t, temperature=2.0, mask=mask),
        "jsd_0.3": losses.generalized_jsd_loss(s, t, beta=0.3, temperature=2.0, mask=mask),
        "topk": losses.topk_kl_loss(s, values, indices, temperature=2.0, mask=mask),
        "logit_mse": losses.logit_mse_loss(s, t, mask=mask),
    }


def test_divergences_zero_iff_identical():
    s, t, _ = make_inputs(seed=6)
    for name, value in all_divergences(s, s.detach().clone()).items():
        assert abs(value.item()) < 1e-12, name
    for name, value in all_divergences(s, t).items():
        assert value.item() > 1e-3, name
    # a constant shift of the logits is the same distribution: every divergence is 0
    shifted = s.detach() + 7.0
    for name, value in all_divergences(s, shifted).items():
        if name != "logit_mse":
            assert abs(value.item()) < 1e-10, name


@pytest.mark.parametrize("garbage", [float("inf"), float("nan"), 1e30, -1e30])
def test_padding_positions_never_change_value_or_gradient(garbage):
    s, t, mask = make_inputs(seed=7)
    clean = all_divergences(s, t, mask)
    grads_clean = {k: torch.autograd.grad(v, s)[0] for k, v in clean.items()}
    s2 = s.detach().clone()
    t2 = t.clone()
    s2[~mask] = garbage
    t2[~mask] = -garbage if garbage == garbage else garbage
    s2.requires_grad_(True)
    dirty = all_divergences(s2, t2, mask)
    for name in clean:
        assert torch.equal(clean[name], dirty[name]), name
        g = torch.autograd.grad(dirty[name], s2)[0]
        assert torch.isfinite(g).all(), name
        assert torch.equal(g[mask], grads_clean[name][mask]), name
        assert torch.count_nonzero(g[~mask]) == 0, name


def test_teacher_masked_vocabulary_entries_contribute_nothing():
    # Classes the teacher rules out with -inf: forward KL and JSD are finite and equal the reference
    # over the remaining classes (the student keeps its full softmax).
    s, t, _ = make_inputs(seed=8)
    t = t.clone()
    t[..., :2] = float("-inf")
    for fn, row_fn in ((losses.kl_div_loss, fwd_kl), (lambda a, b: losses.generalized_jsd_loss(a, b, beta=0.5),
                                                     lambda ps, pt: jsd_row(ps, pt, 0.5))):
        value = fn(s, t)
        (grad,) = torch.autograd.grad(value, s)
        assert torch.isfinite(value) and torch.isfinite(grad).all()
        s_rows, t_rows = s.detach().reshape(-1, 9).tolist(), t.reshape(-1, 9).tolist()
        ref = 0.0
        for a, b in zip(s_rows, t_rows):
            p_t = [0.0, 0.0] + softmax_row(b[2:], 1.0)
            ref += row_fn(softmax_row(a, 1.0), p_t)
        assert value.item() == pytest.approx(ref / len(s_rows), rel=1e-12)


def test_low_precision_inputs_are_computed_in_float32():
    s, t, mask = make_inputs(seed=9)
    for fn in (losses.reverse_kl_loss, lambda a, b, **k: losses.generalized_jsd_loss(a, b, beta=0.4, **k)):
        got = fn(s.detach().bfloat16(), t.bfloat16(), mask=mask)
        assert got.dtype == torch.float32
        ref = fn(s.detach().bfloat16().double(), t.bfloat16().double(), mask=mask)
        assert got.item() == pytest.approx(ref.item(), rel=1e-5)


def test_errors_are_clear():
    s, t, _ = make_inputs()
    with pytest.raises(ValueError, match="beta"):
        losses.generalized_jsd_loss(s, t, beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        losses.reverse_kl_loss(s, t, temperature=0.0)
    with pytest.raises(ValueError, match="differ"):
        losses.reverse_kl_loss(s, t[..., :5])
    with pytest.raises(ValueError, match="mask"):
        losses.generalized_jsd_loss(s, t, mask=torch.ones(3, 5, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------


def test_gradcheck_response_losses():
    s, t, mask = make_inputs(shape=(2, 3, 5), seed=10, scale=1.0)
    values, indices = torch.log_softmax(t / 1.5, -1).topk(2, -1)
    fns = [
        lambda x: losses.kl_div_loss(x, t, temperature=1.5, mask=mask),
        lambda x: losses.reverse_kl_loss(x, t, temperature=1.5, mask=mask),
        lambda x: losses.generalized_jsd_loss(x, t, beta=0.3, temperature=1.5, mask=mask),
        lambda x: losses.generalized_jsd_loss(x, t, beta=0.5, mask=mask, num_items=7),
        lambda x: losses.topk_kl_loss(x, values, indices, temperature=1.5, mask=mask),
        lambda x: losses.topk_kl_loss(x, values.exp(), indices, teacher_values="probs", mask=mask),
    ]
    for fn in fns:
        assert torch.autograd.gradcheck(fn, (s,))


# ----------------------------------------------------------------------------------------------
# Top-k KL
# ----------------------------------------------------------------------------------------------


def topk_reference(student, teacher_full_probs_rows, topk_rows, temperature, tail_rows=None):
    """Loops: sum over top-k of p_T (log p_T - log p_S) plus the tail as one extra class."""
    total = 0.0
    s_rows = student.reshape(-1, student.shape[-1]).tolist()
    for r, (s, p_t, top) in enumerate(zip(s_rows, teacher_full_probs_rows, topk_rows)):
        p_s = softmax_row(s, temperature)
        row = sum(p_t[i] * math.log(p_t[i] / p_s[i]) for i in top if p_t[i] > 0)
        t_miss = (1.0 - sum(p_t[i] for i in top)) if tail_rows is None else tail_rows[r]
        s_miss = sum(p_s[i] for i in range(len(s)) if i not in top)
        if t_miss > 0:
            row += t_miss * math.log(t_miss / s_miss)
        total += temperature**2 * row
    return total / len(s_rows)


@pytest.mark.parametrize("teacher_values", ["logprobs", "probs"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_with_k_equal_vocab_is_the_dense_kl(teacher_values, temperature):
    s, t, mask = make_inputs(seed=11)
    log_p_t = torch.log_softmax(t / temperature, -1)
    values, indices = log_p_t.topk(9, -1)
    values = values if teacher_values == "logprobs" else values.exp()
    got = losses.topk_kl_loss(s, values, indices, teacher_values=teacher_values, temperature=temperature,
                              mask=mask, num_items=13)
    dense = losses.kl_div_loss(s, t, temperature=temperature, mask=mask, num_items=13)
    assert got.item() == pytest.approx(dense.item(), rel=1e-12)
    (g1,) = torch.autograd.grad(got, s)
    (g2,) = torch.autograd.grad(dense, s)
    assert torch.allclose(g1, g2, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_topk_tail_term_matches_reference(k):
    s, t, _ = make_inputs(seed=12)
    temperature = 1.7
    probs = torch.softmax(t / temperature, -1)
    values, indices = probs.log().topk(k, -1)
    got = losses.topk_kl_loss(s, values, indices, temperature=temperature)
    ref = topk_reference(s, probs.reshape(-1, 9).tolist(), indices.reshape(-1, k).tolist(), temperature)
    assert got.item() == pytest.approx(ref, rel=1e-10)
    # the same with probabilities, and with an explicitly given tail mass
    got_p = losses.topk_kl_loss(s, values.exp(), indices, teacher_values="probs", temperature=temperature)
    assert got_p.item() == pytest.approx(ref, rel=1e-10)
    tail = torch.full(s.shape[:-1], 0.25, dtype=DTYPE)
    got_tail = losses.topk_kl_loss(s, values, indices, teacher_tail_mass=tail, temperature=temperature)
    ref_tail = topk_reference(s, probs.reshape(-1, 9).tolist(), indices.reshape(-1, k).tolist(), temperature,
                              tail_rows=[0.25] * tail.numel())
    assert got_tail.item() == pytest.approx(ref_tail, rel=1e-10)


def test_topk_is_zero_for_matching_student_and_positive_otherwise():
    s, t, _ = make_inputs(seed=13)
    values, indices = torch.log_softmax(s.detach(), -1).topk(4, -1)
    assert abs(losses.topk_kl_loss(s, values, indices).item()) < 1e-12
    values, indices = torch.log_softmax(t, -1).topk(4, -1)
    assert losses.topk_kl_loss(s, values, indices).item() > 1e-3


def test_topk_tail_is_stable_when_topk_holds_almost_everything():
    # p_S,miss ~ 1e-30: log1p(-sum) would round to log(0); the logsumexp form stays exact.
    s = torch.tensor([[80.0, 0.0, 0.0, -5.0]], dtype=torch.float32, requires_grad=True)
    values = torch.tensor([[math.log(0.5)]])
    indices = torch.tensor([[0]])
    got = losses.topk_kl_loss(s, values, indices)
    log_z = torch.logsumexp(s.detach().double(), -1).item()
    log_s_miss = torch.logsumexp(s.detach().double()[0, 1:], -1).item() - log_z
    ref = 0.5 * (math.log(0.5) - (80.0 - log_z)) + 0.5 * (math.log(0.5) - log_s_miss)
    assert torch.isfinite(got) and got.item() == pytest.approx(ref, rel=1e-6)
    assert torch.isfinite(torch.autograd.grad(got, s)[0]).all()


def test_topk_padding_rows_may_hold_invalid_indices():
    s, t, mask = make_inputs(seed=14)
    values, indices = torch.log_softmax(t, -1).topk(3, -1)
    clean = losses.topk_kl_loss(s, values, indices, mask=mask)
    bad_idx, bad_val = indices.clone(), values.clone()
    bad_idx[~mask] = 10_000
    bad_val[~mask] = float("nan")
    assert torch.equal(losses.topk_kl_loss(s, bad_val, bad_idx, mask=mask), clean)


def test_topk_shape_errors():
    s, t, _ = make_inputs()
    values, indices = torch.log_softmax(t, -1).topk(3, -1)
    with pytest.raises(ValueError, match="same shape"):
        losses.topk_kl_loss(s, values[..., :2], indices)
    with pytest.raises(ValueError, match="do not match"):
        losses.topk_kl_loss(s[:, :2], values, indices)
    with pytest.raises(ValueError, match="teacher_values"):
        losses.topk_kl_loss(s, values, indices, teacher_values="logits")

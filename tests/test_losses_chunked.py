"""Chunked and fused-linear KL / JSD: exact parity with the dense losses, and bounded buffers."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from hf_distill import losses


def assert_close(got, expected, rtol=1e-5):
    """Relative agreement within rtol, elementwise, with an absolute floor of rtol * max |expected|."""
    atol = rtol * expected.abs().max().item() + 1e-300
    assert torch.allclose(got, expected, rtol=rtol, atol=atol), (got - expected).abs().max().item()


def dense_reference(s, t, beta, temperature, mask, num_items):
    return losses.generalized_jsd_loss(s, t, beta=beta, temperature=temperature, mask=mask, num_items=num_items)


def logits(dtype, seed=0, shape=(3, 7, 50), scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_(True)
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    mask = torch.rand(shape[:-1], generator=g) > 0.35
    return s, t, mask


CASES = [
    # beta, temperature, use mask, num_items, chunk_size
    (0.0, 1.0, False, None, 4),
    (0.0, 2.0, True, None, 5),
    (0.0, 1.0, True, 40, 1000),
    (1.0, 1.0, False, None, 3),
    (1.0, 3.0, True, 33, 8),
    (0.5, 1.0, True, None, 6),
    (0.1, 2.0, False, 50, 7),
    (0.9, 0.5, True, None, 1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("beta,temperature,use_mask,num_items,chunk_size", CASES)
def test_chunked_matches_dense_value_and_gradient(dtype, beta, temperature, use_mask, num_items, chunk_size):
    s, t, mask = logits(dtype, seed=int(beta * 10) + chunk_size)
    mask = mask if use_mask else None
    dense = dense_reference(s, t, beta, temperature, mask, num_items)
    (g_dense,) = torch.autograd.grad(dense, s)
    if beta == 0.0:
        chunked = losses.chunked_kl_loss(s, t, chunk_size=chunk_size, temperature=temperature, mask=mask,
                                         num_items=num_items)
    else:
        chunked = losses.chunked_generalized_jsd_loss(s, t, beta=beta, chunk_size=chunk_size,
                                                      temperature=temperature, mask=mask, num_items=num_items)
    (g_chunked,) = torch.autograd.grad(chunked, s)
    assert chunked.dtype == dense.dtype
    assert_close(chunked, dense)
    assert_close(g_chunked, g_dense)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("beta,temperature,use_mask,num_items,chunk_size", CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_fused_linear_matches_dense_value_and_gradients(dtype, beta, temperature, use_mask, num_items, chunk_size,
                                                        bias):
    g = torch.Generator().manual_seed(chunk_size)
    vocab, h_s_dim, h_t_dim = 40, 8, 12
    h_s = torch.randn(3, 7, h_s_dim, generator=g, dtype=dtype).requires_grad_(True)
    w_s = torch.randn(vocab, h_s_dim, generator=g, dtype=dtype).requires_grad_(True)
    b_s = torch.randn(vocab, generator=g, dtype=dtype).requires_grad_(True) if bias else None
    h_t = torch.randn(3, 7, h_t_dim, generator=g, dtype=dtype)
    w_t = torch.randn(vocab, h_t_dim, generator=g, dtype=dtype)
    b_t = torch.randn(vocab, generator=g, dtype=dtype) if bias else None
    mask = (torch.rand(3, 7, generator=g) > 0.35) if use_mask else None
    params = [h_s, w_s] + ([b_s] if bias else [])

    dense = dense_reference(F.linear(h_s, w_s, b_s), F.linear(h_t, w_t, b_t), beta, temperature, mask, num_items)
    g_dense = torch.autograd.grad(dense, params)
    fused = losses.fused_linear_kl_loss(
        h_s, w_s, h_t, w_t, student_bias=b_s, teacher_bias=b_t, chunk_size=chunk_size, temperature=temperature,
        beta=None if beta == 0.0 else beta, mask=mask, num_items=num_items,
    )
    g_fused = torch.autograd.grad(fused, params)
    assert_close(fused, dense)
    for a, b in zip(g_fused, g_dense):
        assert a.dtype == b.dtype
        assert_close(a, b)


def test_padding_rows_are_skipped_whatever_they_hold():
    s, t, mask = logits(torch.float32, seed=3)
    clean = losses.chunked_generalized_jsd_loss(s, t, beta=0.3, mask=mask, chunk_size=4)
    (g_clean,) = torch.autograd.grad(clean, s)
    s2, t2 = s.detach().clone(), t.clone()
    s2[~mask] = float("nan")
    t2[~mask] = float("inf")
    s2.requires_grad_(True)
    dirty = losses.chunked_generalized_jsd_loss(s2, t2, beta=0.3, mask=mask, chunk_size=4)
    (g,) = torch.autograd.grad(dirty, s2)
    assert torch.equal(clean, dirty) and torch.equal(g[mask], g_clean[mask]) and torch.count_nonzero(g[~mask]) == 0
    # fused: garbage hidden states at padding positions
    h_s = torch.randn(3, 7, 4, requires_grad=True)
    w_s = torch.randn(50, 4, requires_grad=True)
    h_t, w_t = torch.randn(3, 7, 6), torch.randn(50, 6)
    clean = losses.fused_linear_kl_loss(h_s, w_s, h_t, w_t, mask=mask, chunk_size=5)
    g_clean = torch.autograd.grad(clean, (h_s, w_s))
    h_s2, h_t2 = h_s.detach().clone(), h_t.clone()
    h_s2[~mask] = float("nan")
    h_t2[~mask] = float("nan")
    h_s2.requires_grad_(True)
    dirty = losses.fused_linear_kl_loss(h_s2, w_s, h_t2, w_t, mask=mask, chunk_size=5)
    g = torch.autograd.grad(dirty, (h_s2, w_s))
    assert torch.equal(clean, dirty) and torch.equal(g[1], g_clean[1]) and torch.equal(g[0][mask], g_clean[0][mask])


def test_zero_for_identical_positive_otherwise_and_empty_mask():
    s, t, _ = logits(torch.float64, seed=4)
    for beta in (0.0, 0.5, 1.0):
        assert losses.chunked_generalized_jsd_loss(s, s.detach(), beta=beta, chunk_size=4).item() == pytest.approx(
            0.0, abs=1e-12)
        assert losses.chunked_generalized_jsd_loss(s, t, beta=beta, chunk_size=4).item() > 1e-3
    none = torch.zeros(3, 7, dtype=torch.bool)
    value = losses.chunked_kl_loss(s, t, mask=none)
    (g,) = torch.autograd.grad(value, s)
    assert value.item() == 0.0 and torch.count_nonzero(g) == 0


def test_backward_scales_with_upstream_gradient_and_graph_can_be_reused():
    s, t, mask = logits(torch.float64, seed=5)
    dense = losses.kl_div_loss(s, t, temperature=2.0, mask=mask)
    (g_dense,) = torch.autograd.grad(3.0 * dense, s)
    chunked = losses.chunked_kl_loss(s, t, temperature=2.0, mask=mask, chunk_size=4)
    (g1,) = torch.autograd.grad(3.0 * chunked, s, retain_graph=True)
    (g2,) = torch.autograd.grad(3.0 * chunked, s)
    assert_close(g1, g_dense)
    assert torch.equal(g1, g2)
    # combined with another term, and the teacher gets no gradient
    t_leaf = t.clone().requires_grad_(True)
    total = losses.chunked_kl_loss(s, t_leaf, chunk_size=4) + 0.5 * (s**2).mean()
    total.backward()
    assert t_leaf.grad is None and s.grad is not None


def test_no_grad_forward_and_frozen_projection():
    s, t, _ = logits(torch.float32, seed=6)
    with torch.no_grad():
        value = losses.chunked_kl_loss(s, t)
    assert value.item() == pytest.approx(losses.kl_div_loss(s, t).item(), rel=1e-5)
    # a frozen output projection: only the hidden states get a gradient
    h_s = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    w_s = torch.randn(30, 4, dtype=torch.float64)
    h_t, w_t = torch.randn(2, 5, 4, dtype=torch.float64), torch.randn(30, 4, dtype=torch.float64)
    fused = losses.fused_linear_kl_loss(h_s, w_s, h_t, w_t, chunk_size=3)
    (g,) = torch.autograd.grad(fused, h_s)
    (g_ref,) = torch.autograd.grad(losses.kl_div_loss(h_s @ w_s.T, h_t @ w_t.T), h_s)
    assert_close(g, g_ref)


def test_gradcheck_chunked_and_fused():
    s, t, mask = logits(torch.float64, seed=7, shape=(2, 3, 6), scale=1.0)
    for beta in (0.0, 0.4, 1.0):
        assert torch.autograd.gradcheck(
            lambda x: losses.chunked_generalized_jsd_loss(x, t, beta=beta, temperature=1.5, mask=mask, chunk_size=2),
            (s,))
    h_s = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    w_s = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    b_s = torch.randn(6, dtype=torch.float64, requires_grad=True)
    h_t, w_t = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a, b, c: losses.fused_linear_kl_loss(a, b, h_t, w_t, student_bias=c, beta=0.3, temperature=2.0,
                                                    mask=mask, chunk_size=2),
        (h_s, w_s, b_s))


def test_errors():
    s, t, _ = logits(torch.float32)
    with pytest.raises(ValueError, match="chunk_size"):
        losses.chunked_kl_loss(s, t, chunk_size=0)
    with pytest.raises(ValueError, match="beta"):
        losses.chunked_generalized_jsd_loss(s, t, beta=-0.1)
    with pytest.raises(ValueError, match="differ"):
        losses.chunked_kl_loss(s, t[..., :10])
    with pytest.raises(ValueError, match="vocabulary"):
        losses.fused_linear_kl_loss(torch.randn(2, 4), torch.randn(10, 4), torch.randn(2, 4), torch.randn(11, 4))
    with pytest.raises(ValueError, match=r"expected \(vocab, hidden\)"):
        losses.fused_linear_kl_loss(torch.randn(2, 4), torch.randn(10, 5), torch.randn(2, 4), torch.randn(10, 4))


# ----------------------------------------------------------------------------------------------
# Memory: record every tensor the kernels allocate (views and in-place ops excluded).
# ----------------------------------------------------------------------------------------------


class AllocationRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        for ret, value in zip(returns, outputs):
            if isinstance(value, torch.Tensor) and ret.alias_info is None:
                self.sizes.append(value.numel())
        return out


def test_fused_never_allocates_a_full_logits_sized_tensor():
    n_tokens, vocab, chunk = 64, 500, 8
    h_s = torch.randn(n_tokens, 16, requires_grad=True)
    w_s = torch.randn(vocab, 16, requires_grad=True)
    h_t, w_t = torch.randn(n_tokens, 24), torch.randn(vocab, 24)
    full = n_tokens * vocab
    with AllocationRecorder() as fused_rec:
        losses.fused_linear_kl_loss(h_s, w_s, h_t, w_t, chunk_size=chunk, beta=0.5).backward()
    assert max(fused_rec.sizes) <= max(chunk * vocab, w_s.numel(), h_s.numel())
    # the chunked loss keeps exactly one logits-sized buffer (the stored gradient)
    s = (h_s @ w_s.T).detach().requires_grad_(True)
    t = h_t @ w_t.T
    with AllocationRecorder() as chunked_rec:
        losses.chunked_generalized_jsd_loss(s, t, chunk_size=chunk, beta=0.5).backward()
    assert sum(size >= full for size in chunked_rec.sizes) == 1
    assert max(size for size in chunked_rec.sizes if size < full) <= chunk * vocab
    # while the dense loss allocates many of them
    with AllocationRecorder() as dense_rec:
        losses.generalized_jsd_loss(s, t, beta=0.5).backward()
    assert sum(size >= full for size in dense_rec.sizes) >= 8


def test_non_contiguous_logits_and_shifted_views():
    # causal-LM style: logits[:, :-1] is a non-contiguous view
    s_full, t_full, mask = logits(torch.float64, seed=8, shape=(3, 8, 20))
    s, t, m = s_full[:, :-1], t_full[:, :-1], mask[:, :-1]
    dense = losses.generalized_jsd_loss(s, t, beta=0.7, temperature=1.3, mask=m)
    (g_dense,) = torch.autograd.grad(dense, s_full)
    chunked = losses.chunked_generalized_jsd_loss(s, t, beta=0.7, temperature=1.3, mask=m, chunk_size=3)
    (g_chunked,) = torch.autograd.grad(chunked, s_full)
    assert_close(chunked, dense)
    assert_close(g_chunked, g_dense)


def test_bfloat16_inputs_follow_the_dense_low_precision_path():
    g = torch.Generator().manual_seed(9)
    h_s = torch.randn(2, 6, 8, generator=g).bfloat16().requires_grad_(True)
    w_s = (torch.randn(64, 8, generator=g) / 3).bfloat16().requires_grad_(True)
    h_t, w_t = torch.randn(2, 6, 8, generator=g).bfloat16(), (torch.randn(64, 8, generator=g) / 3).bfloat16()
    mask = torch.rand(2, 6, generator=g) > 0.3
    dense = losses.kl_div_loss(h_s @ w_s.T, h_t @ w_t.T, temperature=2.0, mask=mask)
    g_dense = torch.autograd.grad(dense, (h_s, w_s))
    fused = losses.fused_linear_kl_loss(h_s, w_s, h_t, w_t, temperature=2.0, mask=mask, chunk_size=4)
    g_fused = torch.autograd.grad(fused, (h_s, w_s))
    assert fused.dtype == torch.float32
    assert fused.item() == pytest.approx(dense.item(), rel=1e-4)
    for a, b in zip(g_fused, g_dense):
        assert a.dtype == torch.bfloat16
        assert_close(a.float(), b.float(), rtol=2e-2)
    s = (h_s @ w_s.T).detach().requires_grad_(True)
    chunked = losses.chunked_kl_loss(s, h_t @ w_t.T, temperature=2.0, mask=mask, chunk_size=4)
    (g_c,) = torch.autograd.grad(chunked, s)
    (g_d,) = torch.autograd.grad(losses.kl_div_loss(s, h_t @ w_t.T, temperature=2.0, mask=mask), s)
    assert g_c.dtype == torch.bfloat16 and chunked.item() == pytest.approx(dense.item(), rel=1e-5)
    assert_close(g_c.float(), g_d.float(), rtol=1e-2)

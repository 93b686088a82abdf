"""The core losses against hand-computed values and DistilBERT's own formulas."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hf_distill import losses


def test_kl_hand_computed():
    # Two classes, T = 1: p_T = (0.5, 0.5); student logits (log 3, 0) -> p_S = (0.75, 0.25).
    s = torch.tensor([[math.log(3.0), 0.0]])
    t = torch.tensor([[0.0, 0.0]])
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert losses.kl_div_loss(s, t).item() == pytest.approx(expected, rel=1e-5)
    # T = 2 scales logits by 1/2 and the result by 4.
    p_s = torch.softmax(s / 2, -1)[0]
    expected_t2 = 4 * sum(0.5 * math.log(0.5 / p_s[i].item()) for i in range(2))
    assert losses.kl_div_loss(s, t, temperature=2.0).item() == pytest.approx(expected_t2, rel=1e-5)


def test_kl_gradient_hand_computed():
    # d/ds KL(p_T || softmax(s/T)) * T^2 = T * (p_S - p_T) per row, divided by the item count.
    torch.manual_seed(0)
    s = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, dtype=torch.float64)
    temperature = 2.0
    losses.kl_div_loss(s, t, temperature=temperature).backward()
    expected = temperature * (torch.softmax(s / temperature, -1) - torch.softmax(t / temperature, -1)) / 3
    assert torch.allclose(s.grad.double(), expected, atol=1e-6)


def test_cosine_and_mse_hand_computed():
    hs = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    ht = torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    # cos = 0 and 1 -> losses 1 and 0 -> mean 0.5
    assert losses.cosine_loss(hs, ht).item() == pytest.approx(0.5)
    # squared errors per row: (1+1)/2 = 1 and (1+1)/2 = 1
    assert losses.hidden_mse_loss(hs, ht).item() == pytest.approx(1.0)
    mask = torch.tensor([False, True])
    assert losses.cosine_loss(hs, ht, mask=mask).item() == pytest.approx(0.0, abs=1e-7)
    # logit MSE sums over classes: rows 2 and 2 -> 2
    assert losses.logit_mse_loss(hs, ht).item() == pytest.approx(2.0)


def test_cross_entropy_matches_torch_and_num_items():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.randint(0, 11, (2, 6))
    labels[0, :3] = -100
    ref = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), ignore_index=-100)
    assert torch.allclose(losses.cross_entropy_loss(logits, labels), ref, atol=1e-6)
    # Normalising by a larger global count scales the value down exactly.
    n_valid = int((labels != -100).sum())
    got = losses.cross_entropy_loss(logits, labels, num_items=2 * n_valid)
    assert torch.allclose(got, ref / 2, atol=1e-6)


def _distilbert_reference(s_logits, t_logits, s_hidden, t_hidden, attention_mask, lm_labels, temperature,
                          restrict_ce_to_mask):
    """DistilBERT's distiller.py step, re-stated with torch.nn modules on the same inputs."""
    if restrict_ce_to_mask:
        mask = (lm_labels > -1).unsqueeze(-1).expand_as(s_logits)
    else:
        mask = attention_mask.bool().unsqueeze(-1).expand_as(s_logits)
    vocab = s_logits.size(-1)
    s_sel = torch.masked_select(s_logits, mask).view(-1, vocab)
    t_sel = torch.masked_select(t_logits, mask).view(-1, vocab)
    loss_ce = nn.KLDivLoss(reduction="batchmean")(
        F.log_softmax(s_sel / temperature, dim=-1), F.softmax(t_sel / temperature, dim=-1)) * temperature**2
    loss_mlm = nn.CrossEntropyLoss(ignore_index=-100)(s_logits.view(-1, vocab), lm_labels.view(-1))
    loss_mse = nn.MSELoss(reduction="sum")(s_sel, t_sel) / s_sel.size(0)
    dim = s_hidden.size(-1)
    hmask = attention_mask.bool().unsqueeze(-1).expand_as(s_hidden)
    s_h = torch.masked_select(s_hidden, hmask).view(-1, dim)
    t_h = torch.masked_select(t_hidden, hmask).view(-1, dim)
    target = s_h.new(s_h.size(0)).fill_(1)
    loss_cos = nn.CosineEmbeddingLoss(reduction="mean")(s_h, t_h, target)
    return loss_ce, loss_mlm, loss_cos, loss_mse


@pytest.mark.parametrize("restrict", [False, True])
def test_parity_with_distilbert_formulas(restrict):
    torch.manual_seed(1)
    b, L, V, H = 4, 9, 37, 16
    s_logits, t_logits = torch.randn(b, L, V) * 3, torch.randn(b, L, V) * 3
    s_hidden, t_hidden = torch.randn(b, L, H), torch.randn(b, L, H)
    lengths = torch.tensor([9, 5, 7, 3])
    attention_mask = (torch.arange(L)[None] < lengths[:, None]).long()
    lm_labels = torch.full((b, L), -100)
    pick = (torch.rand(b, L) < 0.3) & attention_mask.bool()
    pick[:, 1] = True
    lm_labels[pick] = torch.randint(0, V, (int(pick.sum()),))
    ref_ce, ref_mlm, ref_cos, ref_mse = _distilbert_reference(
        s_logits, t_logits, s_hidden, t_hidden, attention_mask, lm_labels, 2.0, restrict)
    kd_mask = (lm_labels != -100) if restrict else attention_mask.bool()
    assert torch.allclose(losses.kl_div_loss(s_logits, t_logits, temperature=2.0, mask=kd_mask), ref_ce, rtol=1e-5)
    assert torch.allclose(losses.cross_entropy_loss(s_logits, lm_labels), ref_mlm, rtol=1e-5)
    assert torch.allclose(losses.cosine_loss(s_hidden, t_hidden, mask=attention_mask.bool()), ref_cos, rtol=1e-5)
    assert torch.allclose(losses.logit_mse_loss(s_logits, t_logits, mask=kd_mask), ref_mse, rtol=1e-5)


def test_masked_positions_never_matter():
    torch.manual_seed(2)
    s, t = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]]).bool()
    base = losses.kl_div_loss(s, t, mask=mask)
    s2, t2 = s.clone(), t.clone()
    s2[~mask] = float("inf")
    t2[~mask] = 1e4
    assert torch.equal(losses.kl_div_loss(s2, t2, mask=mask), base)


def test_bf16_inputs_are_computed_in_fp32():
    torch.manual_seed(3)
    s, t = torch.randn(8, 50), torch.randn(8, 50)
    ref = losses.kl_div_loss(s.bfloat16().float(), t.bfloat16().float())
    got = losses.kl_div_loss(s.bfloat16(), t.bfloat16())
    assert got.dtype == torch.float32 and torch.allclose(got, ref) and got >= 0

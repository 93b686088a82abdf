"""DistilBERT-style masking: exact counts, weighted selection, 80/10/10 split, determinism."""

from __future__ import annotations

import math
import pickle
from collections import Counter
from fractions import Fraction

import pytest
import torch

from hf_distill.data import DistilMLMCollator, count_tokens, token_sampling_weights
from tiny import make_wordpiece_tokenizer, sample_texts


@pytest.fixture(scope="module")
def tok():
    return make_wordpiece_tokenizer()


@pytest.fixture(scope="module")
def features(tok):
    enc = tok(sample_texts(400, seed=1))
    return [{"input_ids": ids} for ids in enc["input_ids"]]


@pytest.fixture(scope="module")
def specials(tok):
    return set(tok.all_special_ids)


def exact_ceil(p: float, n: int) -> int:
    return math.ceil(Fraction(str(p)) * n)


def batches(features, size, n_batches, start=0):
    for i in range(n_batches):
        lo = (start + i * size) % (len(features) - size)
        yield features[lo : lo + size]


def originals(batch_features, width, pad_id, left=False):
    out = torch.full((len(batch_features), width), pad_id, dtype=torch.long)
    for r, f in enumerate(batch_features):
        ids = torch.as_tensor(f["input_ids"])
        if left:
            out[r, width - len(ids) :] = ids
        else:
            out[r, : len(ids)] = ids
    return out


def test_selected_count_is_exact_ceil(tok, features):
    counts = count_tokens([f["input_ids"] for f in features], len(tok), progress=False)
    for p, token_counts in [(0.15, counts), (0.15, None), (0.3, counts), (0.01, None)]:
        collator = DistilMLMCollator(tok, mlm_probability=p, token_counts=token_counts, seed=3)
        for size in (1, 3, 8, 17):
            for feats in batches(features, size, 5, start=size):
                out = collator(feats)
                real = int(out["attention_mask"].sum())
                assert real == sum(len(f["input_ids"]) for f in feats)
                assert int((out["labels"] != -100).sum()) == exact_ceil(p, real)


def test_ceil_is_free_of_float_noise(tok):
    # 0.15 * 100 == 15.000000000000002 in floats; the recipe means 15 positions.
    collator = DistilMLMCollator(tok, seed=0)
    assert collator.num_to_mask(100) == 15
    assert collator.num_to_mask(101) == 16
    feats = [{"input_ids": [2] + [50 + (i % 40) for i in range(48)] + [3]} for _ in range(2)]  # 100 real tokens
    assert int((collator(feats)["labels"] != -100).sum()) == 15


def test_specials_and_padding_never_selected_labels_and_untouched_positions(tok, features, specials):
    collator = DistilMLMCollator(tok, seed=11, pad_to_multiple_of=8)
    pad = tok.pad_token_id
    n_pad_positions = 0
    for feats in batches(features, 16, 150):
        out = collator(feats)
        ids, labels, attn = out["input_ids"], out["labels"], out["attention_mask"]
        assert ids.shape[1] % 8 == 0 and ids.dtype == torch.long and labels.dtype == torch.long
        orig = originals(feats, ids.shape[1], pad)
        selected = labels != -100
        n_pad_positions += int((attn == 0).sum())
        assert not selected[attn == 0].any()
        assert not any(int(t) in specials for t in orig[selected])
        # labels: the original id at selected positions
        assert torch.equal(labels[selected], orig[selected])
        # everything not selected is left exactly as it was (specials and padding included)
        assert torch.equal(ids[~selected], orig[~selected])
        # replacements are [MASK] or non-special tokens
        changed = selected & (ids != orig)
        assert all(int(t) == tok.mask_token_id or int(t) not in specials for t in ids[changed])
    assert n_pad_positions > 1000  # padding really was present


def test_80_10_10_split(tok, features, specials):
    collator = DistilMLMCollator(tok, seed=5)
    kinds = Counter()
    random_ids = Counter()
    n_sel = 0
    for feats in batches(features, 64, 400):
        out = collator(feats)
        orig = originals(feats, out["input_ids"].shape[1], tok.pad_token_id)
        sel = out["labels"] != -100
        new, old = out["input_ids"][sel], orig[sel]
        is_mask = new == tok.mask_token_id
        is_keep = new == old
        is_random = ~is_mask & ~is_keep
        kinds.update(mask=int(is_mask.sum()), keep=int(is_keep.sum()), random=int(is_random.sum()))
        random_ids.update(new[is_random].tolist())
        n_sel += int(sel.sum())
        if n_sel >= 20_000:
            break
    assert n_sel >= 20_000
    share = {k: v / n_sel for k, v in kinds.items()}
    assert 0.78 <= share["mask"] <= 0.82
    # a random draw equal to the original counts as "keep": expected 0.1 * (1 - 1/115) vs 0.1 * (1 + 1/115)
    assert 0.085 <= share["random"] <= 0.115
    assert 0.085 <= share["keep"] <= 0.115
    non_special = len(tok) - len(specials)
    assert not set(random_ids) & specials
    assert len(random_ids) >= 0.9 * non_special  # drawn from the whole non-special vocabulary


def test_ratio_extremes(tok, features):
    feats = features[:32]
    orig = originals(feats, max(len(f["input_ids"]) for f in feats), tok.pad_token_id)
    all_mask = DistilMLMCollator(tok, mask_ratio=1.0, random_ratio=0.0, seed=0)(feats)
    sel = all_mask["labels"] != -100
    assert (all_mask["input_ids"][sel] == tok.mask_token_id).all()
    keep = DistilMLMCollator(tok, mask_ratio=0.0, random_ratio=0.0, seed=0)(feats)
    assert torch.equal(keep["input_ids"], orig) and int((keep["labels"] != -100).sum()) > 0


def test_sampling_weights_formula(tok, specials):
    counts = torch.arange(len(tok)) * 10
    weights = token_sampling_weights(tok, counts, smoothing=0.7)
    for i in range(len(tok)):
        expected = 0.0 if i in specials else max(int(counts[i]), 1) ** -0.7
        assert weights[i].item() == pytest.approx(expected, rel=1e-12)
    uniform = token_sampling_weights(tok, None)
    assert sorted(set(uniform.tolist())) == [0.0, 1.0]
    assert {i for i, w in enumerate(uniform.tolist()) if w == 0.0} == specials
    with pytest.raises(ValueError, match="count_tokens"):
        token_sampling_weights(tok, counts[:10])


def test_smoothing_selection_ratio_per_occurrence(tok):
    a, b = 60, 70  # two ordinary tokens; a is 100x more frequent than b in the corpus
    counts = torch.ones(len(tok), dtype=torch.long) * 1000
    counts[a], counts[b] = 100_000, 1_000
    collator = DistilMLMCollator(tok, token_counts=counts, smoothing=0.7, mlm_probability=0.01, seed=123)
    gen = torch.Generator().manual_seed(0)
    occ = Counter()
    picked = Counter()
    for _ in range(300):
        feats = []
        for _ in range(64):
            body = torch.where(torch.rand(50, generator=gen) < 0.75, a, b)
            feats.append({"input_ids": [tok.cls_token_id] + body.tolist() + [tok.sep_token_id]})
        out = collator(feats)
        labels = out["labels"]
        occ.update(a=sum(f["input_ids"].count(a) for f in feats), b=sum(f["input_ids"].count(b) for f in feats))
        picked.update(a=int((labels == a).sum()), b=int((labels == b).sum()))
    assert picked["a"] > 800  # enough events for a ~4% standard error
    ratio = (picked["a"] / occ["a"]) / (picked["b"] / occ["b"])
    assert ratio == pytest.approx(100**-0.7, rel=0.12)
    # uniform weights: the two tokens are picked at the same rate per occurrence
    uniform = DistilMLMCollator(tok, mlm_probability=0.01, seed=1)
    picked_u, occ_u = Counter(), Counter()
    for _ in range(60):
        feats = [{"input_ids": [2] + torch.where(torch.rand(50, generator=gen) < 0.75, a, b).tolist() + [3]} for _ in range(64)]
        lab = uniform(feats)["labels"]
        occ_u.update(a=sum(f["input_ids"].count(a) for f in feats), b=sum(f["input_ids"].count(b) for f in feats))
        picked_u.update(a=int((lab == a).sum()), b=int((lab == b).sum()))
    assert (picked_u["a"] / occ_u["a"]) / (picked_u["b"] / occ_u["b"]) == pytest.approx(1.0, rel=0.15)


def test_determinism_and_no_global_rng_use(tok, features):
    feats = features[:24]
    c1 = DistilMLMCollator(tok, seed=7)
    c2 = DistilMLMCollator(tok, seed=7)
    state = torch.get_rng_state()
    outs1 = [c1(feats) for _ in range(3)]
    assert torch.equal(torch.get_rng_state(), state)  # seeded collator leaves the global RNG alone
    outs2 = [c2(feats) for _ in range(3)]
    for o1, o2 in zip(outs1, outs2):
        for key in o1:
            assert torch.equal(o1[key], o2[key])
    assert not torch.equal(outs1[0]["labels"], outs1[1]["labels"])  # the stream moves on between calls
    other = DistilMLMCollator(tok, seed=8)(feats)
    assert not torch.equal(other["labels"], outs1[0]["labels"])
    # seed=None: reproducible through torch's global seed
    unseeded = DistilMLMCollator(tok)
    torch.manual_seed(0)
    u1 = unseeded(feats)
    torch.manual_seed(0)
    u2 = unseeded(feats)
    assert torch.equal(u1["input_ids"], u2["input_ids"]) and torch.equal(u1["labels"], u2["labels"])
    # a pickled copy continues the same random stream
    copy = pickle.loads(pickle.dumps(c1))
    assert torch.equal(copy(feats)["labels"], c1(feats)["labels"])


def test_tensor_features_optional_columns_and_left_padding(tok, features):
    feats = [
        {
            "input_ids": torch.tensor(f["input_ids"]),
            "attention_mask": torch.ones(len(f["input_ids"]), dtype=torch.long),
            "token_type_ids": torch.zeros(len(f["input_ids"]), dtype=torch.long),
        }
        for f in features[:6]
    ]
    feats[0]["attention_mask"][-3:] = 0  # positions the caller marked as not real
    out = DistilMLMCollator(tok, seed=0)(feats)
    assert set(out) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert out["attention_mask"][0, len(feats[0]["input_ids"]) - 3 : len(feats[0]["input_ids"])].sum() == 0
    assert int((out["labels"] != -100).sum()) == exact_ceil(0.15, int(out["attention_mask"].sum()))
    assert not (out["labels"][out["attention_mask"] == 0] != -100).any()

    # special_tokens_mask: marked positions are never selected, and the key is not returned
    stm = [{"input_ids": f["input_ids"], "special_tokens_mask": [1] * 4 + [0] * (len(f["input_ids"]) - 4)} for f in features[:8]]
    collator = DistilMLMCollator(tok, seed=1)
    for _ in range(30):
        o = collator(stm)
        assert "special_tokens_mask" not in o and not (o["labels"][:, :4] != -100).any()

    left_tok = make_wordpiece_tokenizer()
    left_tok.padding_side = "left"
    lf = features[:5]
    lo = DistilMLMCollator(left_tok, seed=0)(lf)
    width = lo["input_ids"].shape[1]
    orig = originals(lf, width, tok.pad_token_id, left=True)
    sel = lo["labels"] != -100
    assert torch.equal(lo["input_ids"][~sel], orig[~sel]) and torch.equal(lo["labels"][sel], orig[sel])
    assert lo["attention_mask"][:, -1].all()


def test_rejects_bad_input(tok, features):
    collator = DistilMLMCollator(tok, seed=0)
    with pytest.raises(ValueError, match="already contain 'labels'"):
        collator([{"input_ids": [2, 50, 3], "labels": [-100, 50, -100]}])
    with pytest.raises(ValueError, match=r"\['text'\]"):
        collator([{"input_ids": [2, 50, 3], "text": "the"}])
    with pytest.raises(ValueError, match="outside"):
        collator([{"input_ids": [2, len(tok) + 5, 3]}])
    with pytest.raises(ValueError, match="mlm_probability"):
        DistilMLMCollator(tok, mlm_probability=0.0)
    with pytest.raises(ValueError, match="sum to at most 1"):
        DistilMLMCollator(tok, mask_ratio=0.8, random_ratio=0.3)
    # a batch with nothing maskable gives no labels rather than an error
    out = collator([{"input_ids": [2, 3]}])
    assert (out["labels"] == -100).all()


def test_count_tokens(tok, features):
    import datasets

    seqs = [f["input_ids"] for f in features[:50]]
    expected = Counter(t for s in seqs for t in s)
    from_lists = count_tokens(seqs, len(tok), batch_size=7, progress=False)
    assert from_lists.dtype == torch.int64 and from_lists.shape == (len(tok),)
    assert {i: int(c) for i, c in enumerate(from_lists) if c} == dict(expected)
    ds = datasets.Dataset.from_dict({"input_ids": seqs})
    assert torch.equal(count_tokens(ds, len(tok), batch_size=16, progress=False), from_lists)
    tensors = [torch.tensor(s) for s in seqs]
    assert torch.equal(count_tokens(tensors, len(tok), progress=False), from_lists)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        count_tokens([[1, 2, 500]], len(tok), progress=False)


def test_dataloader_single_and_multi_worker(tok, features):
    collator = DistilMLMCollator(tok, seed=4)
    loader = torch.utils.data.DataLoader(features[:64], batch_size=16, collate_fn=collator)
    seen = 0
    for batch in loader:
        assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
        assert int((batch["labels"] != -100).sum()) == exact_ceil(0.15, int(batch["attention_mask"].sum()))
        seen += batch["input_ids"].shape[0]
    assert seen == 64

    # two workers get the same batches of data but must not repeat each other's masks
    same = [features[0]] * 8 * 4
    runs = []
    for _ in range(2):
        loader = torch.utils.data.DataLoader(
            same, batch_size=8, collate_fn=collator, num_workers=2, generator=torch.Generator().manual_seed(0)
        )
        runs.append([b["labels"] for b in loader])
    first = runs[0]
    assert not torch.equal(first[0], first[1])  # batch 0 from worker 0, batch 1 from worker 1
    for x, y in zip(runs[0], runs[1]):  # reproducible run to run
        assert torch.equal(x, y)


def test_content_seeded_masks_depend_only_on_the_batch(tok, features):
    feats = list(features[:8])
    """Resumable masking: the same batch gets the same masks whatever happened before."""
    c = DistilMLMCollator(tok, seed=3, content_seeded=True)
    first = c(feats)
    torch.manual_seed(123)
    c(feats[:3])  # other batches in between change nothing
    again = DistilMLMCollator(tok, seed=3, content_seeded=True)(feats)
    assert torch.equal(first["input_ids"], again["input_ids"]) and torch.equal(first["labels"], again["labels"])
    other_seed = DistilMLMCollator(tok, seed=4, content_seeded=True)(feats)
    assert not torch.equal(first["labels"], other_seed["labels"])
    other_batch = c(feats[1:] + feats[:1])
    assert not torch.equal(other_batch["labels"], first["labels"][list(range(1, len(feats))) + [0]])


@pytest.mark.parametrize("option", ["mlm_probability", "mask_ratio", "random_ratio"])
def test_nan_masking_ratios_are_refused(tok, option):
    # NaN fails every comparison: it used to pass as a ratio and silently mask nothing
    with pytest.raises(ValueError, match=option):
        DistilMLMCollator(tok, **{option: float("nan")})


def test_nan_smoothing_is_refused(tok):
    with pytest.raises(ValueError, match="smoothing must be a finite number >= 0, got nan"):
        token_sampling_weights(tok, [1] * len(tok), smoothing=float("nan"))

"""Continuous-batching greedy Whisper decoding: the tokens ``model.generate`` gives, row by row, whatever
the pool's composition (rows joining late, at other positions, with or without timestamps)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_distill.speech.greedy_decoding import DecodeRequest, GreedyWhisperDecoder
from test_pseudo_label import build_tiny_whisper


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from transformers import WhisperForConditionalGeneration

    m = WhisperForConditionalGeneration.from_pretrained(build_tiny_whisper(tmp_path_factory.mktemp("w"))).eval()
    gen = m.generation_config  # let this random model emit timestamps: suppress the other specials only
    gen.suppress_tokens = list(range(gen.decoder_start_token_id, gen.no_timestamps_token_id))
    return m


def generate_one(model, hidden, timestamps: bool):
    """``model.generate`` on one row: (prompt, tokens up to end-of-text, log-probabilities)."""
    from transformers.modeling_outputs import BaseModelOutput

    kwargs = dict(return_timestamps=True, force_unique_generate_call=True) if timestamps else {}
    out = model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=hidden[None]),
                         return_dict_in_generate=True, output_scores=True, **kwargs)
    P = out.sequences.shape[1] - len(out.scores)
    seq = out.sequences[0].tolist()
    tokens = seq[P:]
    eos = model.generation_config.eos_token_id
    if eos in tokens:
        tokens = tokens[: tokens.index(eos) + 1]
    lps = [float(torch.log_softmax(out.scores[i][0].float(), -1)[t]) for i, t in enumerate(tokens)]
    return seq[:P], tokens, lps


def test_pool_with_late_rows_and_mixed_rules_matches_generate_row_by_row(model):
    torch.manual_seed(3)
    n = 7
    with torch.inference_mode():
        hidden = model.get_encoder()(torch.randn(n, 80, 3000)).last_hidden_state
        modes = [bool(i % 2) for i in range(n)]  # odd rows with timestamps (a prompt one token shorter)
        want = [generate_one(model, hidden[i], modes[i]) for i in range(n)]
        assert len({len(w[1]) for w in want}) > 1  # rows finish at different steps: the pool changes
        requests = [DecodeRequest(i, hidden[i], want[i][0], modes[i]) for i in range(n)]
        asked = []

        def take(k):  # rows arrive two at a time, whatever the free capacity
            got = requests[len(asked): len(asked) + min(k, 2)]
            asked.extend(got)
            return got

        dec = GreedyWhisperDecoder(model, max_new_tokens=40)
        results = list(dec.stream(take, capacity=3, refill=1))
    assert sorted(r.key for r in results) == list(range(n))
    n_ts = 0
    for r in results:
        prompt, tokens, lps = want[r.key]
        assert r.tokens == tokens[: len(r.tokens)] and (len(r.tokens) == len(tokens) or len(r.tokens) == 40)
        np.testing.assert_allclose(r.logprobs, lps[: len(r.logprobs)], rtol=1e-4, atol=1e-4)
        n_ts += sum(t > model.generation_config.no_timestamps_token_id for t in r.tokens)
    assert n_ts > 0


def test_decode_equals_stream_and_returns_first_logits(model):
    torch.manual_seed(4)
    with torch.inference_mode():
        hidden = model.get_encoder()(torch.randn(3, 80, 3000)).last_hidden_state
        prompt = generate_one(model, hidden[0], False)[0]
        dec = GreedyWhisperDecoder(model, timestamps=False, max_new_tokens=30)
        tokens, logprobs, first = dec.decode(hidden, [prompt] * 3)
        for b in range(3):
            ref = model(encoder_outputs=(hidden[b : b + 1],), decoder_input_ids=torch.tensor([prompt])).logits[0, 0]
            torch.testing.assert_close(first[b], ref.float(), rtol=1e-4, atol=1e-4)
            want = generate_one(model, hidden[b], False)[1]
            assert tokens[b] == want[:30]


def test_bfloat16_encoder_labels_with_a_float32_decoder_and_changes_the_config_hash(tmp_path):
    from hf_distill.speech.labelling import PseudoLabelConfig, load_pseudo_labels, load_teacher, pseudo_label
    from test_pseudo_label import write_clips

    whisper = build_tiny_whisper(tmp_path / "w")
    folder = write_clips(tmp_path / "audio", [1.0, 2.0, 1.5], bad=False)
    plain = PseudoLabelConfig(input=str(folder), model=str(whisper), output_dir=str(tmp_path / "a"))
    bf16 = PseudoLabelConfig(input=str(folder), model=str(whisper), output_dir=str(tmp_path / "b"),
                             encoder_dtype="bfloat16")
    assert "encoder_dtype" not in plain.hashed_fields()  # stores written before the option keep their hash
    assert bf16.hashed_fields()["encoder_dtype"] == "bfloat16"
    teacher = load_teacher(bf16)
    assert next(teacher.model.get_encoder().parameters()).dtype == torch.bfloat16
    assert next(teacher.model.get_decoder().parameters()).dtype == torch.float32
    out = teacher.encode_audio(torch.randn(2, 80, 3000)).last_hidden_state
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="encoder_dtype"):
        PseudoLabelConfig(input=str(folder), model=str(whisper), output_dir="x", encoder_dtype="int8")
    result = pseudo_label(PseudoLabelConfig(input=str(folder), model=str(whisper), progress=False, pack=True,
                                            output_dir=str(tmp_path / "c"), encoder_dtype="bfloat16"))
    assert result["rows"] == 3 and len(load_pseudo_labels(tmp_path / "c")) == 3


# ------------------------------------------------------------------------------------------------ speculative


def _draft(model, d_model=None, layers=1, seed=5):
    """A smaller random Whisper sharing ``model``'s tokenizer and generation config."""
    import copy

    from transformers import WhisperForConditionalGeneration

    cfg = copy.deepcopy(model.config)
    cfg.decoder_layers, cfg.encoder_layers = layers, 1
    if d_model:
        cfg.d_model, cfg.decoder_ffn_dim, cfg.encoder_ffn_dim = d_model, 2 * d_model, 2 * d_model
    torch.manual_seed(seed)
    draft = WhisperForConditionalGeneration(cfg).eval()
    draft.generation_config = model.generation_config
    return draft


@pytest.fixture(scope="module")
def ending_model(tmp_path_factory):
    """The tiny teacher with an end-of-text token it emits in some rows, at different steps (a random model never
    chooses the real one): the text token that ends the most rows at the most different places."""
    from transformers import WhisperForConditionalGeneration

    m = WhisperForConditionalGeneration.from_pretrained(build_tiny_whisper(tmp_path_factory.mktemp("w_eos"))).eval()
    gen = m.generation_config
    gen.suppress_tokens = list(range(gen.decoder_start_token_id, gen.no_timestamps_token_id))
    hidden, prompts = rows_of(8)
    with torch.inference_mode():
        results = GreedyWhisperDecoder(m, max_new_tokens=40).stream(requests_of(hidden, prompts), capacity=8)
        plain = [r.tokens for r in sorted(results, key=lambda r: r.key)]
    ends = {}
    for tokens in plain:
        for tok in set(tokens):
            if 1 <= tok < gen.decoder_start_token_id and tokens.index(tok) > 0:
                ends.setdefault(tok, set()).add(tokens.index(tok))
    gen.eos_token_id = m.config.eos_token_id = max(ends, key=lambda tok: (len(ends[tok]), -tok))
    gen.begin_suppress_tokens = [gen.eos_token_id]
    return m


def rows_of(n: int, seed: int = 3):
    """Encoder outputs of ``n`` rows (varied enough that rows decode differently) and their prompts: odd rows with
    timestamps (no ``<|notimestamps|>``)."""
    torch.manual_seed(seed)
    return 3 * torch.randn(n, 1500, 32), [[300, 301, 304] + ([] if i % 2 else [308]) for i in range(n)]


def requests_of(hidden, prompts, draft_hidden=None):
    return [DecodeRequest(i, hidden[i], prompts[i], len(prompts[i]) == 3,
                          None if draft_hidden is None else draft_hidden[i]) for i in range(len(prompts))]


@pytest.mark.parametrize("draft", ["teacher", "smaller", "other_encoder"])
def test_speculative_decoding_gives_the_greedy_output_token_for_token(ending_model, draft):
    """Rows joining late and finishing at different steps, with and without timestamps, end-of-text inside the
    draft: the tokens, log-probabilities, first-position logits and soft labels of plain greedy decoding, whatever
    the draft proposes (itself: all accepted; a random smaller decoder: few)."""
    from hf_distill.speech.speculative_decoding import SpeculativeWhisperDecoder

    m, k, n = ending_model, 4, 9
    hidden, prompts = rows_of(n)
    draft_model = {"teacher": lambda: m, "smaller": lambda: _draft(m),
                   "other_encoder": lambda: _draft(m, d_model=16, layers=2)}[draft]()
    draft_hidden = torch.randn(n, 1500, 16) if draft == "other_encoder" else None
    with torch.inference_mode():
        want = {r.key: r for r in GreedyWhisperDecoder(m, max_new_tokens=40).stream(
            requests_of(hidden, prompts), capacity=3, refill=1, soft_labels=(3, 1.0))}
        spec = SpeculativeWhisperDecoder(m, draft_model, draft_tokens=k, max_new_tokens=40)
        got = {r.key: r for r in spec.stream(requests_of(hidden, prompts, draft_hidden), capacity=3, refill=1,
                                             soft_labels=(3, 1.0))}
    eos = m.generation_config.eos_token_id
    lengths = {len(w.tokens) for w in want.values()}
    ended = [len(w.tokens) for w in want.values() if w.tokens[-1] == eos]
    assert len(lengths) >= 3 and ended and 40 in lengths  # rows finish at different steps, some at the limit
    for i in range(n):
        assert got[i].tokens == want[i].tokens, i
        np.testing.assert_allclose(got[i].logprobs, want[i].logprobs, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got[i].first_logits, want[i].first_logits)
        assert torch.equal(got[i].soft[0], want[i].soft[0])
        torch.testing.assert_close(got[i].soft[1], want[i].soft[1], rtol=1e-4, atol=1e-5)
    stats = spec.stats
    assert stats["tokens"] == sum(len(w.tokens) for w in want.values())
    print(f"draft {draft}: acceptance {spec.acceptance_rate:.3f}, {stats}")
    # a draft right less than 30% of the time stops proposing (plain steps, the same output)
    assert stats["drafting_stopped"] == (draft == "other_encoder")
    if draft == "teacher":
        assert spec.acceptance_rate == 1.0 and stats["teacher_passes"] < stats["tokens"] / 3
        assert any(length % (k + 1) != 1 for length in ended)  # end-of-text accepted inside a draft
    else:
        assert 0 <= spec.acceptance_rate < 1


def test_a_draft_with_another_vocabulary_is_refused(model):
    from hf_distill.speech.speculative_decoding import SpeculativeWhisperDecoder

    other = _draft(model)
    other.config.vocab_size += 1
    with pytest.raises(ValueError, match=r"does not share the teacher's tokenizer \(vocabulary size"):
        SpeculativeWhisperDecoder(model, other)


@pytest.mark.slow
def test_speculative_decoding_of_tiny_en_equals_its_greedy_decoding(tmp_path_factory):
    """Whisper tiny.en on 8 spoken sentences, with a draft made of two of its decoder layers (first and last,
    untrained, sharing its encoder): the greedy tokens, token for token; the acceptance rate is printed."""
    from transformers import AutoProcessor, WhisperForConditionalGeneration

    from hf_distill.speech.speculative_decoding import SpeculativeWhisperDecoder
    from speech_assets import harvard_clips, read_audio, tiny_en_teacher_dir

    teacher_dir = tiny_en_teacher_dir(tmp_path_factory)
    model = WhisperForConditionalGeneration.from_pretrained(teacher_dir).eval()
    draft = _draft(model, layers=2)
    draft.model.encoder = model.model.encoder
    last = model.config.decoder_layers - 1
    for mine, theirs in zip(draft.model.decoder.layers, [model.model.decoder.layers[0], model.model.decoder.layers[last]]):
        mine.load_state_dict(theirs.state_dict())
    for name in ("embed_tokens", "embed_positions", "layer_norm"):
        getattr(draft.model.decoder, name).load_state_dict(getattr(model.model.decoder, name).state_dict())
    processor = AutoProcessor.from_pretrained(teacher_dir)
    audio = [read_audio(path) for path, _ in harvard_clips(8)]
    features = processor.feature_extractor(audio, sampling_rate=16000, return_tensors="pt").input_features
    prompt = [model.generation_config.decoder_start_token_id, model.generation_config.no_timestamps_token_id]
    with torch.inference_mode():
        hidden = model.get_encoder()(features).last_hidden_state
        requests = [DecodeRequest(i, hidden[i], prompt, False) for i in range(8)]
        want = {r.key: r.tokens for r in GreedyWhisperDecoder(model).stream(requests, capacity=4)}
        spec = SpeculativeWhisperDecoder(model, draft, draft_tokens=4)
        got = {r.key: r.tokens for r in spec.stream(requests, capacity=4)}
    assert got == want
    print(f"tiny.en, 2-layer draft: acceptance {spec.acceptance_rate:.3f}, {spec.stats}")
    assert 0 < spec.acceptance_rate < 1

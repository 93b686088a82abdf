"""Evaluating Whisper models on held-out audio: transcripts, WER with intervals, repetition loops.

:func:`transcribe_whisper` decodes greedily in length-sorted batches (or with Whisper's temperature
fallback, :data:`FALLBACK`); :func:`evaluate_wer` scores any ``transcribe`` function on items with
references; :func:`compare_teacher_and_student` runs both models on the same items and reports the
paired WER difference, loops and speed-ups, as the Distil-Whisper recipe prints them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from hf_distill.speech.audio import AudioItem, decode
from hf_distill.speech.training import batches

__all__ = ["FALLBACK", "compare_teacher_and_student", "evaluate_wer", "transcribe_whisper"]

# Whisper's own decoding schedule (openai-whisper ``transcribe``): a transcript whose compression ratio
# (UTF-8 text over its zlib-compressed length) is above 2.4 or whose mean token log-probability is below -1
# is decoded again, sampled at the next temperature; the last temperature's transcript is kept.
FALLBACK = {"temperature": (0.0, 0.2, 0.4, 0.6, 0.8, 1.0), "compression_ratio_threshold": 2.4,
            "logprob_threshold": -1.0}


def _generate_with_logprobs(model, hidden, temperature: float, generate_kwargs: dict):
    """``generate`` on encoder states at one temperature (greedy at 0, else sampled from the whole
    distribution: no top-k), returning the token ids and each row's mean log-probability of its generated
    tokens (end token included), taken from the processed logits before the temperature divides them."""
    from transformers.modeling_outputs import BaseModelOutput

    kwargs = dict(generate_kwargs, return_dict_in_generate=True, output_scores=True)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0)
    out = model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), **kwargs)
    sequences = out.sequences
    steps = len(out.scores)
    generated = sequences[:, sequences.shape[1] - steps:]
    scale = float(temperature) if temperature > 0 else 1.0
    # each step's picked token only: no (rows, steps, vocabulary) tensor of log-probabilities
    picked = torch.stack([torch.log_softmax(s.float() * scale, dim=-1).gather(-1, generated[:, k, None])[:, 0]
                          for k, s in enumerate(out.scores)], dim=1)
    eos = model.generation_config.eos_token_id
    eos = torch.tensor(eos if isinstance(eos, (list, tuple)) else [eos], device=generated.device)
    is_end = torch.isin(generated, eos).long()
    # tokens up to and including the first end token count; what generate pads after it does not
    keep = (is_end.cumsum(dim=1) - is_end) == 0
    mean = (picked.masked_fill(~keep, 0.0).sum(dim=1) / keep.sum(dim=1).clamp(min=1)).tolist()
    return sequences, mean


def _decode_with_fallback(model, processor, hidden, schedule: dict, generate_kwargs: dict) -> list[str]:
    """Whisper's temperature fallback on one batch of encoder states (see :data:`FALLBACK`)."""
    from hf_distill.speech.labelling.text import compression_ratio

    temperatures = tuple(schedule["temperature"])
    ratio_limit = schedule.get("compression_ratio_threshold")
    logprob_limit = schedule.get("logprob_threshold")
    texts: list[str] = [""] * hidden.shape[0]
    pending = list(range(hidden.shape[0]))
    for temperature in temperatures:
        ids, mean_logprob = _generate_with_logprobs(model, hidden[pending], temperature, generate_kwargs)
        decoded = [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]
        still = []
        for row, text, logprob in zip(pending, decoded, mean_logprob):
            texts[row] = text
            if ((ratio_limit is not None and compression_ratio(text) > ratio_limit)
                    or (logprob_limit is not None and logprob < logprob_limit)):
                still.append(row)
        pending = still
        if not pending:
            break
    return texts


@torch.inference_mode()
def transcribe_whisper(model, processor, audios: Sequence[np.ndarray], *, batch_size: int = 8,
                       timings: dict[str, float] | None = None, **generate_kwargs) -> list[str]:
    """Greedy transcripts (unless ``generate_kwargs`` say otherwise) of 16 kHz-rate audio arrays, in order.

    Audio longer than Whisper's window is transcribed with Whisper's sequential long-form decoding
    (timestamps), shorter audio in length-sorted batches: its encoder runs first, then ``generate`` on
    the encoder's output, so that ``timings`` (if given) adds up the seconds of ``features``, ``encoder``
    and ``decoder`` (the generation loop, fallback re-decoding included) apart, and ``long_form`` for the
    long audio. With a temperature schedule (``temperature`` a tuple, e.g. ``**FALLBACK``) short audio is
    decoded with openai-whisper's fallback, computed here on the text (transformers' own fallback measures
    the compression of token ids instead, which lets loops of text through); long audio passes the schedule
    to transformers' long-form ``generate``.
    """
    from transformers.modeling_outputs import BaseModelOutput

    timings = {} if timings is None else timings
    for key in ("features", "encoder", "decoder", "long_form"):
        timings.setdefault(key, 0.0)
    fe = processor.feature_extractor
    rate = int(fe.sampling_rate)
    window = int(getattr(fe, "n_samples", 30 * rate))
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    generate_kwargs.setdefault("num_beams", 1)
    fallback = isinstance(generate_kwargs.get("temperature"), (tuple, list))
    limit = getattr(model.config, "max_target_positions", None)
    if limit and generate_kwargs.get("max_new_tokens") and generate_kwargs["max_new_tokens"] > limit - 4:
        generate_kwargs["max_new_tokens"] = limit - 4  # room for the decoder prompt (start, language, task, ...)
    schedule = {k: generate_kwargs[k] for k in FALLBACK if k in generate_kwargs} if fallback else {}
    short_kwargs = {k: v for k, v in generate_kwargs.items() if k not in schedule}
    out: list[str | None] = [None] * len(audios)
    short = sorted((i for i, a in enumerate(audios) if len(a) <= window), key=lambda i: -len(audios[i]))
    for idx in batches(short, batch_size):
        t0 = time.perf_counter()
        feats = fe([audios[i] for i in idx], sampling_rate=rate, return_tensors="pt").input_features
        t1 = time.perf_counter()
        hidden = model.get_encoder()(input_features=feats.to(device, dtype)).last_hidden_state
        t2 = time.perf_counter()
        if fallback:
            texts = _decode_with_fallback(model, processor, hidden, schedule, short_kwargs)
        else:
            ids = model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), **short_kwargs)
            ids = ids["sequences"] if isinstance(ids, dict) else ids
            texts = [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]
        timings["features"] += t1 - t0
        timings["encoder"] += t2 - t1
        timings["decoder"] += time.perf_counter() - t2
        for i, text in zip(idx, texts):
            out[i] = text
    for i in (i for i, a in enumerate(audios) if len(a) > window):
        t0 = time.perf_counter()
        feats = fe(audios[i], sampling_rate=rate, return_tensors="pt", truncation=False, padding="longest",
                   return_attention_mask=True)
        ids = model.generate(feats.input_features.to(device, dtype), attention_mask=feats.attention_mask.to(device),
                             return_timestamps=True, **generate_kwargs)
        ids = ids["sequences"] if isinstance(ids, dict) else ids
        out[i] = processor.batch_decode(ids, skip_special_tokens=True)[0].strip()
        timings["long_form"] += time.perf_counter() - t0
    return [t or "" for t in out]


def evaluate_wer(transcribe, items: Sequence[AudioItem], sampling_rate: int,
                 loop_compression_ratio: float = 2.4) -> dict[str, Any]:
    """Corpus WER (Whisper English normaliser) of ``transcribe(list of arrays) -> list of texts`` on
    items with references; also the wall time of the transcription, and the repetition loops: the
    transcripts whose gzip compression ratio exceeds ``loop_compression_ratio`` (Whisper's own test for
    a decoder stuck repeating itself) and those more than twice as long as their reference in
    normalised words (which catches loops of varied pieces, "RAP-DAP-DAP-Damp-Emp-Emp", that compress
    too little to pass the ratio)."""
    from hf_distill.speech.labelling.text import compression_ratio
    from hf_distill.speech.text_normalizer import normalize_english, utterance_errors, wer, wer_interval

    items = [it for it in items if it.reference is not None]
    audios = [decode(it, sampling_rate) for it in items]
    t0 = time.perf_counter()
    hyps = transcribe(audios) if audios else []
    seconds = time.perf_counter() - t0
    refs = [it.reference for it in items]
    ratios = [compression_ratio(h) if h else 0.0 for h in hyps]
    loops = [it.id for it, r in zip(items, ratios) if r > loop_compression_ratio]
    too_long = [it.id for it, r, h in zip(items, refs, hyps)
                if len(normalize_english(h).split()) > 2 * max(1, len(normalize_english(r).split()))]
    errors, words = utterance_errors(refs, hyps)
    return {
        "wer": wer(refs, hyps) if items else None,
        "wer_ci": wer_interval(errors, words) if items else None,
        "errors": errors,
        "words": words,
        "compression_ratio_max": max(ratios, default=0.0),
        "compression_ratio_outliers": loops,
        "over_twice_the_reference_length": too_long,
        "n": len(items),
        "audio_seconds": float(sum(len(a) for a in audios) / sampling_rate),
        "seconds": seconds,
        "examples": [{"id": it.id, "reference": r, "hypothesis": h} for it, r, h in zip(items, refs, hyps)],
    }



def compare_teacher_and_student(teacher, teacher_processor, student, student_processor,
                                items: Sequence[AudioItem], *, batch_size: int = 8, speed_clips: int = 0,
                                fallback: bool = False, seed: int = 0, device=None,
                                **generate_kwargs) -> dict[str, Any]:
    """Teacher and student on the same held-out items: ``teacher`` and ``student`` (greedy, batched),
    ``*_batch_1`` (the first ``speed_clips`` items one at a time), ``student_minus_teacher_wer`` (paired
    over the items), the whole-transcription and decoder speed-ups; with ``fallback`` also both models
    under Whisper's temperature fallback (:data:`FALLBACK`, sampling seeded with ``seed``; no speed-up is
    given for it) and their paired difference."""
    from hf_distill.speech.text_normalizer import paired_wer_difference

    rate = int(teacher_processor.feature_extractor.sampling_rate)
    runs = [(batch_size, list(items), "", {}), (1, list(items[:speed_clips]), "_batch_1", {})]
    if fallback:
        runs.append((batch_size, list(items), "_fallback", FALLBACK))
    evaluation: dict[str, Any] = {}
    for name, model, proc in (("teacher", teacher, teacher_processor), ("student", student, student_processor)):
        if device is not None:
            model.to(device)
        for size, subset, suffix, extra in runs:
            if not subset:
                continue
            torch.manual_seed(seed)
            parts: dict[str, float] = {}
            evaluation[name + suffix] = evaluate_wer(
                lambda audios, m=model, p=proc, b=size, t=parts, x=extra: transcribe_whisper(
                    m, p, audios, batch_size=b, timings=t, **generate_kwargs, **x), subset, rate)
            evaluation[name + suffix]["timings"] = parts
    for suffix in ("", "_fallback"):
        t, s = evaluation.get("teacher" + suffix), evaluation.get("student" + suffix)
        if t and s:
            evaluation["student_minus_teacher_wer" + suffix] = paired_wer_difference(s["errors"], t["errors"],
                                                                                     t["words"])
    for suffix in ("", "_batch_1"):
        t, s = evaluation.get("teacher" + suffix), evaluation.get("student" + suffix)
        if t and s and s["seconds"] > 0 and s["timings"]["decoder"] > 0:
            evaluation["student_speedup" + suffix] = t["seconds"] / s["seconds"]
            evaluation["student_decoder_speedup" + suffix] = t["timings"]["decoder"] / s["timings"]["decoder"]
    return evaluation

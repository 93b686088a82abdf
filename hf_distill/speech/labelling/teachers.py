"""Speech teachers: Whisper (greedy decoding on the pool decoder, or ``generate`` for beam search) and CTC.

A teacher loads the model and its processor, says how it cuts long recordings (its window, overlap and frame
hop), prepares model inputs from audio and turns model outputs into :class:`SegmentResult`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hf_distill.speech.windows import Chunk, plan_chunks

__all__ = ["CTCTeacher", "SegmentResult", "Teacher", "WhisperTeacher", "load_teacher", "pick_device",
           "torch_dtype"]


@dataclass
class SegmentResult:
    """What the teacher gives for one window of a recording."""

    token_ids: np.ndarray  # whisper: generated tokens after the prompt; ctc: argmax per kept frame
    prompt_ids: np.ndarray | None = None
    logprobs: np.ndarray | None = None  # whisper: log-prob of each token
    no_speech_prob: float | None = None
    max_posteriors: np.ndarray | None = None  # ctc: per kept frame
    soft: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    segments: list[dict] | None = None


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def pick_device(config) -> str:
    import torch

    if config.device:
        return config.device
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    return "cpu"


def _detect_teacher_type(model: str) -> str:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model)
    if cfg.model_type == "whisper":
        return "whisper"
    archs = " ".join(getattr(cfg, "architectures", None) or [])
    if "CTC" in archs or hasattr(cfg, "conv_stride"):
        return "ctc"
    raise ValueError(f"cannot tell the teacher type of {model} (model_type {cfg.model_type!r}); pass --teacher-type")


class Teacher:
    kind: str
    sampling_rate: int
    window: int  # samples per chunk
    overlap: int
    hop: int

    min_samples: int = 1  # shorter inputs give the teacher nothing to look at

    def __init__(self, config, device: str, model_class):
        """The processor (feature extractor and tokenizer) and the model of ``config.model``, in inference mode."""
        import torch
        from transformers import AutoProcessor

        self.config, self.device, self._torch = config, device, torch
        self.processor = AutoProcessor.from_pretrained(config.model)
        self.feature_extractor = getattr(self.processor, "feature_extractor", self.processor)
        self.tokenizer = self.processor.tokenizer
        self.model = model_class.from_pretrained(config.model, dtype=torch_dtype(config.dtype))
        self.model.to(device).eval().requires_grad_(False)
        self.sampling_rate = int(self.feature_extractor.sampling_rate)
        self.overlap = int(round(config.chunk_overlap_s * self.sampling_rate))

    def plan(self, num_samples: int) -> list[Chunk]:
        return plan_chunks(num_samples, self.window, self.overlap, self.hop)

    def describe(self) -> dict[str, Any]:
        return {"type": self.kind, "sampling_rate": self.sampling_rate, "chunk_samples": self.window,
                "overlap_samples": self.overlap, "hop": self.hop, "vocab_size": int(self.model.config.vocab_size)}


class WhisperTeacher(Teacher):
    kind = "whisper"

    def __init__(self, config, device: str):
        from transformers import WhisperForConditionalGeneration

        super().__init__(config, device, WhisperForConditionalGeneration)
        if config.encoder_dtype is not None:  # e.g. a bfloat16 encoder (where the CPU has bf16 arithmetic) before a
            self.model.get_encoder().to(torch_dtype(config.encoder_dtype))  # float32 decoder
        max_window = int(getattr(self.feature_extractor, "n_samples", 30 * self.sampling_rate))
        window_s = config.chunk_length_s if config.chunk_length_s is not None else max_window / self.sampling_rate
        self.window = int(round(window_s * self.sampling_rate))
        if self.window > max_window:
            raise ValueError(
                f"chunk_length_s {window_s} exceeds Whisper's window of {max_window / self.sampling_rate:g} s"
            )
        self.hop = 1
        gen = self.model.generation_config
        self.eos_id = int(gen.eos_token_id if isinstance(gen.eos_token_id, int) else gen.eos_token_id[0])
        self.sot_id = int(gen.decoder_start_token_id)
        self.lang_ids = {int(v) for v in (getattr(gen, "lang_to_id", None) or {}).values()}
        self.task_ids = {int(v) for v in (getattr(gen, "task_to_id", None) or {}).values()}
        nts = getattr(gen, "no_timestamps_token_id", None)
        self.no_timestamps_id = int(nts) if nts is not None else None
        # timestamps: the ids from no-timestamps + 1, time_precision seconds each; Whisper's special tokens start
        # at start-of-transcript (end-of-text, just before it in the real vocabularies, is special too)
        self.timestamp_begin = self.no_timestamps_id + 1 if nts is not None else None
        self.special_begin = self.sot_id
        positions = int(getattr(self.model.config, "max_source_positions", 1500))
        self.time_precision = max_window / self.sampling_rate / positions
        self.no_speech_id = None
        vocab = self.tokenizer.get_vocab()
        for tok in ("<|nospeech|>", "<|nocaptions|>"):
            if tok in vocab:
                self.no_speech_id = int(vocab[tok])
                break
        self.gen_kwargs: dict[str, Any] = {"return_dict_in_generate": True, "num_beams": config.num_beams}
        if config.language is not None:
            self.gen_kwargs["language"] = config.language
        if config.task is not None:
            self.gen_kwargs["task"] = config.task
        if config.return_timestamps:
            self.gen_kwargs["return_timestamps"] = True
            self.gen_kwargs["force_unique_generate_call"] = True
        if config.max_new_tokens is not None:
            self.gen_kwargs["max_new_tokens"] = config.max_new_tokens
        self._prompt_cache: dict[bool, list[int]] = {}
        # greedy decoding: the pool decoder (the tokens generate gives, Whisper's log-probabilities under the
        # decoding rules, soft labels from the same pass), with a draft model when given; beam search: run()
        self.greedy = None
        if config.num_beams == 1:
            from hf_distill.speech.greedy_decoding import GreedyWhisperDecoder

            self.greedy = GreedyWhisperDecoder(self.model, max_new_tokens=config.max_new_tokens)
        self.draft, self.draft_shares_encoder = None, False
        if config.draft_model is not None:
            self._load_draft(config)

    def _load_draft(self, config) -> None:
        """The draft of speculative decoding; it reads the teacher's encoder output when its encoder is the
        teacher's (a student with the teacher's frozen encoder), else its own."""
        from transformers import WhisperForConditionalGeneration

        from hf_distill.speech.speculative_decoding import SpeculativeWhisperDecoder

        try:
            draft = WhisperForConditionalGeneration.from_pretrained(config.draft_model, dtype=torch_dtype(config.dtype))
        except OSError as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise FileNotFoundError(f"cannot load the draft model {config.draft_model!r}: {first} (give a folder with "
                                    "a Whisper model sharing the teacher's tokenizer)") from exc
        self.draft = draft.to(self.device).eval().requires_grad_(False)
        mine, theirs = self.model.get_encoder().state_dict(), self.draft.get_encoder().state_dict()
        self.draft_shares_encoder = mine.keys() == theirs.keys() and all(
            mine[k].shape == theirs[k].shape and self._torch.equal(mine[k], theirs[k].to(mine[k].dtype)) for k in mine)
        self.greedy = SpeculativeWhisperDecoder(self.model, self.draft, config.draft_tokens, config.max_new_tokens)

    def draft_hidden(self, features):
        """The draft's encoder output for ``features``, or None where it is the teacher's."""
        if self.draft is None or self.draft_shares_encoder:
            return None
        encoder = self.draft.get_encoder()
        return encoder(features.to(self.device, dtype=next(encoder.parameters()).dtype)).last_hidden_state

    def describe(self):
        return {**super().describe(), "eos_token_id": self.eos_id, "no_speech_token_id": self.no_speech_id}

    def prepare(self, audios: list[np.ndarray]):
        feats = self.feature_extractor(audios, sampling_rate=self.sampling_rate, return_tensors="pt")
        return feats["input_features"]

    def encode_audio(self, features):
        """The encoder's output for log-mel ``features`` [B, 80, 3000], in the decoder's dtype (the encoder may
        run in its own, ``encoder_dtype``)."""
        from transformers.modeling_outputs import BaseModelOutput

        encoder = self.model.get_encoder()
        enc_dtype = next(encoder.parameters()).dtype
        hidden = encoder(features.to(self.device, dtype=enc_dtype)).last_hidden_state
        return BaseModelOutput(last_hidden_state=hidden.to(self.model.get_decoder().embed_tokens.weight.dtype))

    def _prompt_length(self, seq: list[int]) -> int:
        """sot, then at most one language, one task and one no-timestamps token, in that order."""
        p = 1 if seq and seq[0] == self.sot_id else 0
        if p < len(seq) and seq[p] in self.lang_ids:
            p += 1
        if p < len(seq) and seq[p] in self.task_ids:
            p += 1
        if not self.config.return_timestamps and p < len(seq) and seq[p] == self.no_timestamps_id:
            p += 1
        return p

    def run(self, features, windows=None) -> list[SegmentResult]:
        """Beam search (``generate``) on a batch of log-mel ``features``, then one teacher-forced pass for the
        log-probabilities and soft labels."""
        torch = self._torch
        from hf_distill.store.format import topk_from_logits

        model = self.model
        with torch.inference_mode():
            encoder_outputs = self.encode_audio(features)
            gen = model.generate(encoder_outputs=encoder_outputs, **self.gen_kwargs)
            sequences = gen.sequences if hasattr(gen, "sequences") else gen
            if sequences.shape[1] < 2:
                sequences = torch.cat([sequences, torch.full_like(sequences[:, :1], self.eos_id)], dim=1)
            logits = model(encoder_outputs=encoder_outputs, decoder_input_ids=sequences[:, :-1]).logits
        results = []
        seqs = sequences.cpu().tolist()
        for b, seq in enumerate(seqs):
            p = max(1, self._prompt_length(seq))
            end = len(seq)
            for j in range(p, len(seq)):
                if seq[j] == self.eos_id:
                    end = j + 1
                    break
            tokens = seq[p:end]
            row_logits = logits[b, p - 1 : end - 1].float()
            logp = torch.log_softmax(row_logits, dim=-1)
            tok_t = torch.as_tensor(tokens, dtype=torch.long, device=logp.device)
            token_logprobs = logp.gather(-1, tok_t[:, None])[:, 0] if len(tokens) else logp.new_zeros(0)
            soft = None
            if self.config.top_k:
                soft = topk_from_logits(row_logits, self.config.top_k, self.config.soft_label_temperature)
            results.append(self.segment_result(tokens, seq[:p], token_logprobs.cpu().numpy(), logits[b, 0], soft))
        return results

    def no_speech_prob(self, first_logits, prompt: Sequence[int]) -> float | None:
        """Probability of the no-speech token at the first decoding position (raw ``first_logits`` [V]), as
        Whisper computes it; None without such a token or when the prompt does not open the transcript."""
        if self.no_speech_id is None or not len(prompt) or int(prompt[0]) != self.sot_id:
            return None
        return float(self._torch.softmax(first_logits.float(), dim=-1)[self.no_speech_id])

    def segment_result(self, tokens, prompt: Sequence[int], logprobs, first_logits, soft=None) -> SegmentResult:
        """The :class:`SegmentResult` of ``tokens`` decoded after ``prompt``: their log-probabilities, the raw logits
        at the first decoding position (for the no-speech probability) and the ``(indices, probs, tail)`` soft
        labels."""
        from hf_distill.store.format import pack_topk

        return SegmentResult(token_ids=np.asarray(tokens, dtype=np.int32), prompt_ids=np.asarray(prompt, dtype=np.int32),
                             logprobs=np.asarray(logprobs, dtype=np.float64),
                             no_speech_prob=self.no_speech_prob(first_logits, prompt),
                             soft=pack_topk(*soft) if soft is not None else None,
                             segments=self.timestamp_segments(list(tokens)) if self.config.return_timestamps else None)

    def prompts(self, hidden, timestamps: bool) -> list[list[int]]:
        """The decoder prompt ``model.generate`` uses (start of transcript, language, task, no-timestamps) for
        each row of ``hidden`` (encoder outputs): asked of it once (one decoding step on one window), or per
        window when a multilingual teacher has no language set (it detects the language of each window)."""
        from transformers.modeling_outputs import BaseModelOutput

        if timestamps in self._prompt_cache:
            return [list(self._prompt_cache[timestamps]) for _ in range(hidden.shape[0])]
        multilingual = bool(getattr(self.model.generation_config, "is_multilingual", False))
        per_row = multilingual and "language" not in self.gen_kwargs
        probe = hidden if per_row else hidden[:1]
        kwargs: dict[str, Any] = {"max_new_tokens": 1, "return_dict_in_generate": True}
        for key in ("language", "task"):
            if key in self.gen_kwargs:
                kwargs[key] = self.gen_kwargs[key]
        if timestamps:
            kwargs.update(return_timestamps=True, force_unique_generate_call=True)
        out = self.model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=probe), **kwargs)
        seqs = out["sequences"] if isinstance(out, dict) else out.sequences
        prompts = [[int(x) for x in row] for row in seqs[:, :-1].tolist()]
        if per_row:
            return prompts
        self._prompt_cache[timestamps] = prompts[0]
        return [list(prompts[0]) for _ in range(hidden.shape[0])]

    def timestamp_segments(self, tokens: list[int]) -> list[dict]:
        try:
            out = self.tokenizer.decode(tokens, skip_special_tokens=False, output_offsets=True)
        except Exception:  # tokenizer without timestamp support
            return []
        segs = []
        for o in out.get("offsets", []) if isinstance(out, dict) else []:
            start, end = o["timestamp"]
            segs.append(
                {"start": float(start), "end": float(end if end is not None else start), "text": o["text"].strip()}
            )
        return segs

    def text(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(map(int, token_ids)), skip_special_tokens=True).strip()

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)


class CTCTeacher(Teacher):
    kind = "ctc"

    def __init__(self, config, device: str):
        from transformers import AutoModelForCTC

        if config.draft_model is not None:
            raise ValueError("--draft_model speeds up Whisper decoding; a CTC teacher has none: drop --draft_model")
        super().__init__(config, device, AutoModelForCTC)
        ratio = getattr(self.model.config, "inputs_to_logits_ratio", None)
        if ratio is None:
            ratio = int(np.prod(getattr(self.model.config, "conv_stride", [320])))
        self.hop = int(ratio)
        window_s = config.chunk_length_s if config.chunk_length_s is not None else 30.0
        self.window = int(round(window_s * self.sampling_rate))
        self.blank_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.use_mask = bool(getattr(self.feature_extractor, "return_attention_mask", False))
        frames = self._frames(np.arange(1, 8 * self.hop + 1, dtype=np.int64))
        self.min_samples = int(np.argmax(frames >= 1)) + 1 if (frames >= 1).any() else 1

    def describe(self):
        return {**super().describe(), "blank_id": int(self.blank_id)}

    def prepare(self, audios: list[np.ndarray]):
        inputs = self.feature_extractor(audios, sampling_rate=self.sampling_rate, padding=True,
                                        return_attention_mask=self.use_mask, return_tensors="pt")
        lengths = np.asarray([len(a) for a in audios], dtype=np.int64)
        return dict(inputs), lengths

    def _frames(self, lengths: np.ndarray) -> np.ndarray:
        torch = self._torch
        fn = getattr(self.model, "_get_feat_extract_output_lengths", None)
        if fn is not None:
            return np.asarray(fn(torch.as_tensor(lengths)).cpu().numpy(), dtype=np.int64)
        return -(-lengths // self.hop)

    def run(self, prepared, windows: list[Chunk]) -> list[SegmentResult]:
        torch = self._torch
        from hf_distill.store.format import pack_topk, topk_from_logits

        inputs, lengths = prepared
        with torch.inference_mode():
            inputs = {
                k: (v.to(self.device, dtype=self.model.dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in inputs.items()
            }
            logits = self.model(**inputs).logits
        frames = self._frames(lengths)
        results = []
        for b, w in enumerate(windows):
            n_f = min(int(frames[b]), logits.shape[1])
            lo = (w.keep_start - w.start) // self.hop
            hi = n_f if w.keep_end >= w.end else (w.keep_end - w.start) // self.hop
            lo, hi = max(0, min(lo, n_f)), max(0, min(hi, n_f))
            row = logits[b, lo:hi].float()
            probs = torch.softmax(row, dim=-1)
            maxp, arg = probs.max(dim=-1)
            soft = None
            if self.config.top_k:
                soft = pack_topk(*topk_from_logits(row, self.config.top_k, self.config.soft_label_temperature))
            results.append(SegmentResult(token_ids=arg.cpu().numpy().astype(np.int32),
                                         max_posteriors=maxp.cpu().numpy().astype(np.float64), soft=soft))
        return results

    def collapse(self, frame_ids: np.ndarray) -> np.ndarray:
        if len(frame_ids) == 0:
            return frame_ids.astype(np.int32)
        keep = np.ones(len(frame_ids), dtype=bool)
        keep[1:] = frame_ids[1:] != frame_ids[:-1]
        ids = frame_ids[keep]
        return ids[ids != self.blank_id].astype(np.int32)

    def text(self, frame_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(map(int, frame_ids))).strip()


def load_teacher(config, device: str | None = None) -> Teacher:
    """The Whisper or CTC teacher of ``config`` with its processor; a model that cannot be loaded is a
    ``FileNotFoundError`` that names it (one line), not transformers' traceback."""
    try:
        kind = config.teacher_type if config.teacher_type != "auto" else _detect_teacher_type(config.model)
        device = device or pick_device(config)
        return WhisperTeacher(config, device) if kind == "whisper" else CTCTeacher(config, device)
    except OSError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        where = "" if os.path.exists(config.model) else " (no local folder of that name; as a Hub id)"
        raise FileNotFoundError(
            f"cannot load the teacher {config.model!r}{where}: {first} (give a folder with the model and its "
            "processor, or a Hub model id that is in the local cache when offline)") from exc

"""Greedy Whisper decoding with continuous batching: the tokens ``model.generate`` gives, faster.

Decoding a small Whisper on a CPU is bound by memory traffic, not arithmetic: every step reads the
decoder's weights, the 51,864-row output projection and, for every row of the batch, the
cross-attention keys and values of its 1,500 encoder positions. Rows that share a step share the weight
reads; a batch that shrinks as its rows finish (the usual static batch) pays a full step for one or two
rows at the end. Here the batch is a **pool**: a finished row leaves it, and new windows join it at once
(:meth:`GreedyWhisperDecoder.stream`), each row at its own position, with its own prompt and its own
decoding rules (with or without timestamps), so the pool stays full until the work runs out.

Same rules as ``model.generate`` with ``num_beams=1``: ``begin_suppress_tokens`` at the first generated
position, ``suppress_tokens`` everywhere, and for rows with timestamps Whisper's timestamp rules (no
``<|notimestamps|>``; a timestamp first, at most ``max_initial_timestamp_index``; timestamps in pairs
except before end-of-text; never decreasing; a timestamp whenever the timestamps together are more
probable than any single text token). Key/value caches are preallocated, the cross-attention keys and
values are computed once per window and stored contiguously, and the log-probability of each chosen
token (under the rules) and the raw logits of the first prompt position (for the no-speech probability)
come out of the same pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["DecodeRequest", "DecodeResult", "GreedyWhisperDecoder"]


@dataclass
class DecodeRequest:
    """One window to decode: ``hidden`` is its encoder output ``[S, D]``; ``key`` comes back with the result."""

    key: Any
    hidden: Any
    prompt: Sequence[int]
    timestamps: bool


@dataclass
class DecodeResult:
    key: Any
    tokens: list[int]  # generated tokens, end-of-text included when generated
    logprobs: list[float]  # log-probability of each under the decoding rules
    first_logits: Any  # raw logits [V] at the prompt's first position (float32)


class _Pool:
    """The rows being decoded: per-row state as tensors over the batch, caches per decoder layer."""

    def __init__(self):
        self.requests: list[DecodeRequest] = []
        self.tokens: list[list[int]] = []
        self.logprobs: list[list[float]] = []
        self.first: list[Any] = []
        self.pos: list[int] = []  # positions filled in the self-attention cache (host copy)
        self.tensors: dict[str, Any] = {}  # ts, n, limit, last, pen, last_ts, logits
        self.cache: list[tuple[Any, Any]] = []
        self.cross: list[tuple[Any, Any]] = []

    def __len__(self) -> int:
        return len(self.requests)

    def extend(self, other: _Pool) -> None:
        import torch

        if not len(self):
            self.__dict__.update(other.__dict__)
            return
        self.requests += other.requests
        self.tokens += other.tokens
        self.logprobs += other.logprobs
        self.first += other.first
        self.pos += other.pos
        self.tensors = {k: torch.cat([v, other.tensors[k]]) for k, v in self.tensors.items()}
        self.cache = [(torch.cat([k, k2]), torch.cat([v, v2])) for (k, v), (k2, v2) in zip(self.cache, other.cache)]
        self.cross = [(torch.cat([k, k2]), torch.cat([v, v2])) for (k, v), (k2, v2) in zip(self.cross, other.cross)]

    def keep(self, rows: list[int]) -> None:
        import torch

        if len(rows) == len(self):
            return
        index = torch.as_tensor(rows, dtype=torch.long, device=self.tensors["n"].device)
        pick = lambda seq: [seq[r] for r in rows]  # noqa: E731
        self.requests, self.tokens, self.logprobs = pick(self.requests), pick(self.tokens), pick(self.logprobs)
        self.first, self.pos = pick(self.first), pick(self.pos)
        self.tensors = {k: v.index_select(0, index) for k, v in self.tensors.items()}
        self.cache = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.cache]
        self.cross = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.cross]


class GreedyWhisperDecoder:
    """Greedy decoding of a ``WhisperForConditionalGeneration`` with the rules of its generation config.

    :meth:`decode` decodes a batch of encoder outputs (all rows with ``timestamps``); :meth:`stream`
    decodes requests as they come, up to ``capacity`` rows at a time, yielding each result when its row
    finishes.
    """

    def __init__(self, model, *, timestamps: bool = False, max_new_tokens: int | None = None):
        gen = model.generation_config
        config = model.config
        self.model = model
        self.timestamps = timestamps
        eos = gen.eos_token_id if gen.eos_token_id is not None else config.eos_token_id
        self.eos = int(eos if isinstance(eos, int) else eos[0])
        self.no_ts = getattr(gen, "no_timestamps_token_id", None)
        if timestamps and self.no_ts is None:
            raise ValueError("the generation config has no no_timestamps_token_id: no timestamps")
        self.tb = int(self.no_ts) + 1 if self.no_ts is not None else None
        self.max_initial = getattr(gen, "max_initial_timestamp_index", None)
        self.suppress = sorted(int(t) for t in (gen.suppress_tokens or []))
        self.begin_suppress = sorted(int(t) for t in (gen.begin_suppress_tokens or []))
        self.max_positions = int(config.max_target_positions)
        self.max_new_tokens = max_new_tokens
        self.max_length = getattr(gen, "max_length", None)
        self.decoder = model.get_decoder()
        self.heads = int(config.decoder_attention_heads)
        self.head_dim = int(config.d_model) // self.heads
        self.out_weight = model.get_output_embeddings().weight

    # ------------------------------------------------------------------------------------------ model

    def _split(self, x):  # [B, L, D] -> [B, H, L, d]
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def _cross(self, hidden) -> list[tuple[Any, Any]]:
        """Cross-attention keys and values of every layer, contiguous ``[B, H, S, d]``."""
        out = []
        for layer in self.decoder.layers:
            att = layer.encoder_attn
            out.append((self._split(att.k_proj(hidden)).contiguous(), self._split(att.v_proj(hidden)).contiguous()))
        return out

    def _layers(self, h, cache, cross, write, attend):
        """Run the decoder layers on ``h`` [B, L, D]: ``write(k_cache, k_new)`` stores the new keys/values,
        ``attend(q, k_cache, v_cache)`` is the self-attention."""
        import torch.nn.functional as F

        for layer, (k_cache, v_cache), (ck, cv) in zip(self.decoder.layers, cache, cross):
            att = layer.self_attn
            x = layer.self_attn_layer_norm(h)
            q = self._split(att.q_proj(x) * att.scaling)
            write(k_cache, self._split(att.k_proj(x)))
            write(v_cache, self._split(att.v_proj(x)))
            o = attend(q, k_cache, v_cache)
            h = h + att.out_proj(o.transpose(1, 2).reshape(h.shape))
            catt = layer.encoder_attn
            x = layer.encoder_attn_layer_norm(h)
            q = self._split(catt.q_proj(x) * catt.scaling)
            o = F.scaled_dot_product_attention(q, ck, cv, scale=1.0)
            h = h + catt.out_proj(o.transpose(1, 2).reshape(h.shape))
            x = layer.final_layer_norm(h)
            h = h + layer.fc2(layer.activation_fn(layer.fc1(x)))
        return F.linear(self.decoder.layer_norm(h), self.out_weight)

    def _prefill(self, ids, cache, cross):
        """All prompt positions of fresh rows (same prompt length): logits ``[B, P, V]``."""
        import torch.nn.functional as F

        P = ids.shape[1]
        h = self.decoder.embed_tokens(ids) + self.decoder.embed_positions.weight[:P]

        def write(c, new):
            c[:, :, :P] = new

        def attend(q, k, v):
            return F.scaled_dot_product_attention(q, k[:, :, :P], v[:, :, :P], is_causal=P > 1, scale=1.0)

        return self._layers(h, cache, cross, write, attend)

    def _step(self, ids, pos: list[int], cache, cross):
        """One new token per row, row ``b`` at position ``pos[b]``: logits ``[B, V]``."""
        import torch
        import torch.nn.functional as F

        device = ids.device
        end = max(pos) + 1
        uniform = min(pos) == end - 1
        pos_t = torch.as_tensor(pos, dtype=torch.long, device=device)
        h = self.decoder.embed_tokens(ids[:, None]) + self.decoder.embed_positions.weight[pos_t][:, None]
        if uniform:
            p = end - 1

            def write(c, new):
                c[:, :, p] = new[:, :, 0]

            mask = None
        else:
            rows = torch.arange(len(pos), device=device)

            def write(c, new):
                c[rows, :, pos_t] = new[:, :, 0]

            mask = (torch.arange(end, device=device)[None] <= pos_t[:, None])[:, None, None, :]

        def attend(q, k, v):
            return F.scaled_dot_product_attention(q, k[:, :, :end], v[:, :, :end], attn_mask=mask, scale=1.0)

        return self._layers(h, cache, cross, write, attend)[:, -1]

    # ------------------------------------------------------------------------------------------ rules

    def _apply_rules(self, scores, t: dict[str, Any]) -> None:
        """In place on ``scores`` [B, V], each row by its own state (``t``: the pool's tensors)."""
        import torch

        neg = float("-inf")
        n, ts = t["n"], t["ts"]
        first = n == 0
        if self.begin_suppress:
            scores[:, self.begin_suppress] = scores[:, self.begin_suppress].masked_fill(first[:, None], neg)
        if self.suppress:
            scores[:, self.suppress] = neg
        if self.tb is None or not bool(ts.any()):
            return
        tb, V = self.tb, scores.shape[1]
        vocab = torch.arange(V, device=scores.device)[None]
        is_ts_tok = vocab >= tb
        last, pen, last_ts = t["last"], t["pen"], t["last_ts"]
        later = ts & ~first
        last_is_ts = last >= tb
        pen_is_ts = torch.where(n >= 2, pen >= tb, torch.ones_like(last_is_ts))
        block_ts = later & last_is_ts & pen_is_ts  # after a closed pair: text (or end-of-text) next
        block_text = later & last_is_ts & ~pen_is_ts  # after an opening timestamp: a timestamp or end-of-text
        floor = torch.where(last_is_ts & ~pen_is_ts, last_ts, last_ts + 1)
        floor = torch.where(last_ts >= 0, floor, torch.full_like(floor, tb))
        mask = (block_ts[:, None] & is_ts_tok) | (block_text[:, None] & (vocab < self.eos))
        mask |= later[:, None] & is_ts_tok & (vocab < floor[:, None])
        start = ts & first  # the first generated token is a timestamp, not too late
        start_mask = ~is_ts_tok
        if self.max_initial is not None:
            start_mask = start_mask | (vocab > tb + int(self.max_initial))
        mask |= start[:, None] & start_mask
        mask |= ts[:, None] & (vocab == self.no_ts)
        scores.masked_fill_(mask, neg)
        logp = torch.log_softmax(scores, dim=-1)
        ts_lp = logp[:, tb:].logsumexp(dim=-1)
        text_max = logp[:, :tb].max(dim=-1).values
        scores.masked_fill_((ts & (ts_lp > text_max))[:, None] & ~is_ts_tok, neg)

    # ------------------------------------------------------------------------------------------ decoding

    def _limit(self, prompt_len: int) -> int:
        limit = self.max_positions
        if self.max_new_tokens is not None:
            limit = min(limit, prompt_len + int(self.max_new_tokens))
        elif self.max_length is not None:  # as Whisper's generate: max_length plus the (capped) prompt
            limit = min(limit, int(self.max_length) + min(self.max_positions // 2 - 1, prompt_len))
        if limit <= prompt_len:
            raise ValueError(f"no room to generate: prompt of {prompt_len} tokens, limit {limit}")
        return limit

    def _admit(self, requests: list[DecodeRequest]) -> _Pool:
        """Prefill new rows: a pool of them, ready to choose their first token."""
        import torch

        if any(r.timestamps for r in requests) and self.tb is None:
            raise ValueError("the generation config has no no_timestamps_token_id: no timestamps")
        hidden = torch.stack([torch.as_tensor(r.hidden) for r in requests])
        device, dtype = hidden.device, hidden.dtype
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(len(r.prompt), []).append(i)
        cross_all = self._cross(hidden)
        pool = _Pool()
        for P, idx in sorted(groups.items()):
            if P < 1:
                raise ValueError("empty decoder prompt")
            part = _Pool()
            part.requests = [requests[i] for i in idx]
            limits = [self._limit(P) for _ in idx]
            index = torch.as_tensor(idx, dtype=torch.long, device=device)
            part.cross = [(k.index_select(0, index), v.index_select(0, index)) for k, v in cross_all] \
                if len(idx) < len(requests) else cross_all
            shape = (len(idx), self.heads, self.max_positions, self.head_dim)  # one length: pools concatenate
            # zeros, not empty: a masked position still multiplies its value by a zero weight, and 0 * NaN
            # (uninitialised memory) would poison rows that sit at earlier positions than others
            part.cache = [(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
                          for _ in self.decoder.layers]
            ids = torch.as_tensor([list(requests[i].prompt) for i in idx], dtype=torch.long, device=device)
            logits = self._prefill(ids, part.cache, part.cross)
            part.first = list(logits[:, 0].float().clone().unbind(0))
            part.tokens = [[] for _ in idx]
            part.logprobs = [[] for _ in idx]
            part.pos = [P] * len(idx)
            none = torch.full((len(idx),), -1, dtype=torch.long, device=device)
            part.tensors = {
                "ts": torch.as_tensor([requests[i].timestamps for i in idx], dtype=torch.bool, device=device),
                "n": torch.zeros(len(idx), dtype=torch.long, device=device),
                "limit": torch.as_tensor(limits, dtype=torch.long, device=device) - P,  # tokens a row may generate
                "last": none, "pen": none.clone(), "last_ts": none.clone(),
                "logits": logits[:, -1].float(),
            }
            pool.extend(part)
        return pool

    def stream(self, requests: Iterable[DecodeRequest] | Iterator[DecodeRequest], capacity: int,
               refill: int | None = None) -> Iterator[DecodeResult]:
        """Decode ``requests`` (an iterable, or a callable ``take(n)`` returning up to ``n`` requests),
        ``capacity`` rows at a time; rows join whenever at least ``refill`` slots are free (default: a
        quarter of the capacity) or the pool is empty. Results come in finishing order. ``take`` is asked
        again after an empty answer (handling a result may create work); decoding ends when the pool is
        empty and ``take`` has nothing."""
        import torch

        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        refill = max(1, capacity // 4) if refill is None else max(1, int(refill))
        if callable(requests):
            take = requests
        else:
            it = iter(requests)

            def take(k: int) -> list[DecodeRequest]:
                out = []
                for r in it:
                    out.append(r)
                    if len(out) >= k:
                        break
                return out

        pool = _Pool()
        while True:
            free = capacity - len(pool)
            if free > 0 and (free >= refill or not len(pool)):
                new = take(free)  # asked again even after an empty answer: results may create more work
                if new:
                    pool.extend(self._admit(list(new)))
            if not len(pool):
                return
            t = pool.tensors
            logits = t["logits"]
            self._apply_rules(logits, t)
            nxt = logits.argmax(dim=-1)
            lp = torch.log_softmax(logits, dim=-1).gather(-1, nxt[:, None])[:, 0]
            t["n"] = t["n"] + 1
            t["pen"], t["last"] = t["last"], nxt
            if self.tb is not None:
                t["last_ts"] = torch.where(t["ts"] & (nxt >= self.tb), nxt, t["last_ts"])
            done = ((nxt == self.eos) | (t["n"] >= t["limit"])).tolist()
            keep = []
            for r, (tok, v, d) in enumerate(zip(nxt.tolist(), lp.tolist(), done)):
                pool.tokens[r].append(tok)
                pool.logprobs[r].append(v)
                if d:
                    yield DecodeResult(pool.requests[r].key, pool.tokens[r], pool.logprobs[r], pool.first[r])
                else:
                    keep.append(r)
            pool.keep(keep)
            if not len(pool):
                continue
            t = pool.tensors
            t["logits"] = self._step(t["last"], pool.pos, pool.cache, pool.cross).float()
            pool.pos = [p + 1 for p in pool.pos]

    def decode(self, encoder_hidden, prompts):
        """Greedy continuations of ``prompts`` (a token list for every row, or one ``[B, P]`` tensor / list
        of lists) for each row of ``encoder_hidden`` [B, S, D], all with this decoder's ``timestamps``.

        Returns ``(tokens, logprobs, first_logits)``: per row the generated tokens (end-of-text included
        when generated), the log-probability of each under the decoding rules, and the raw logits
        ``[B, V]`` at the prompt's first position (for the no-speech probability).
        """
        import torch

        B = encoder_hidden.shape[0]
        ids = torch.as_tensor(prompts, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids[None].expand(B, -1)
        if ids.shape[0] != B:
            raise ValueError(f"{ids.shape[0]} prompts for {B} rows")
        requests = [DecodeRequest(b, encoder_hidden[b], ids[b].tolist(), self.timestamps) for b in range(B)]
        results = {r.key: r for r in self.stream(requests, capacity=max(1, B))}
        tokens = [results[b].tokens for b in range(B)]
        logprobs = [results[b].logprobs for b in range(B)]
        first = torch.stack([results[b].first_logits for b in range(B)])
        return tokens, logprobs, first

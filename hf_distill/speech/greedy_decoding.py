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

__all__ = ["DecodeRequest", "DecodeResult", "DecoderPool", "GreedyWhisperDecoder", "as_take"]


@dataclass
class DecodeRequest:
    """One window to decode: ``hidden`` is its encoder output ``[S, D]``; ``key`` comes back with the result."""

    key: Any
    hidden: Any
    prompt: Sequence[int]
    timestamps: bool
    draft_hidden: Any = None  # speculative decoding: the draft's encoder output (None: ``hidden``)


@dataclass
class DecodeResult:
    key: Any
    tokens: list[int]  # generated tokens, end-of-text included when generated
    logprobs: list[float]  # log-probability of each under the decoding rules
    first_logits: Any  # raw logits [V] at the prompt's first position (float32)
    soft: tuple[Any, Any, Any] | None = None  # with soft_labels: (indices [n, k], probs [n, k], tail [n]) per token


def as_take(requests) -> Any:
    """``requests`` as a callable ``take(n)`` returning up to ``n`` of them (a callable is returned as it is)."""
    if callable(requests):
        return requests
    it = iter(requests)

    def take(k: int) -> list[DecodeRequest]:
        out = []
        for r in it:
            out.append(r)
            if len(out) >= k:
                break
        return out

    return take


class DecoderPool:
    """The rows being decoded. Caches live in buffers of ``capacity`` rows allocated once; the live rows are
    the first ``len(pool)`` (views, no copies): a new row is written into the next free slot, a finished
    row's slot is filled by moving the last live row into it (one row copied, not the whole pool).
    Per-row state: Python lists, and small tensors over the live rows (``tensors``)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.requests: list[DecodeRequest] = []
        self.tokens: list[list[int]] = []
        self.logprobs: list[list[float]] = []
        self.first: list[Any] = []
        self.soft: list[list[tuple[Any, Any, Any]]] = []  # per row, per token: top-k of the raw distribution
        self.pos: list[int] = []  # positions filled in the self-attention cache (host copy)
        self.tensors: dict[str, Any] = {}  # ts, n, limit, last, pen, last_ts, logits
        self.buffers: list[tuple[Any, Any, Any, Any]] = []  # per layer: self k, self v, cross k, cross v

    def __len__(self) -> int:
        return len(self.requests)

    def allocate(self, n_layers: int, self_shape: tuple, cross_shapes: tuple[tuple, tuple], device, dtype) -> None:
        import torch

        if self.buffers:
            have = (tuple(self.buffers[0][2].shape[1:]), tuple(self.buffers[0][3].shape[1:]))
            if have != tuple(map(tuple, cross_shapes)):
                raise ValueError(f"cross-attention keys/values of shapes {cross_shapes} in a pool of {have}")
            return
        C = self.capacity

        def new(shape):
            return torch.empty((C, *shape), device=device, dtype=dtype)

        k_shape, v_shape = cross_shapes
        self.buffers = [(new(self_shape), new(self_shape), new(k_shape), new(v_shape)) for _ in range(n_layers)]

    def views(self, start: int, stop: int):
        """``(self-attention caches, cross-attention keys/values)`` of slots ``[start, stop)``, per layer."""
        return ([(k[start:stop], v[start:stop]) for k, v, _, _ in self.buffers],
                [(ck[start:stop], cv[start:stop]) for _, _, ck, cv in self.buffers])

    def append(self, requests, first, pos, tensors) -> None:
        import torch

        self.requests += requests
        self.tokens += [[] for _ in requests]
        self.logprobs += [[] for _ in requests]
        self.soft += [[] for _ in requests]
        self.first += first
        self.pos += pos
        self.tensors = {k: torch.cat([self.tensors[k], v]) if self.tensors else v for k, v in tensors.items()}

    def result(self, r: int, soft: bool) -> DecodeResult:
        """The result of live row ``r`` (finished)."""
        import torch

        top = tuple(torch.stack([step[i] for step in self.soft[r]]) for i in range(3)) if soft else None
        return DecodeResult(self.requests[r].key, self.tokens[r], self.logprobs[r], self.first[r], top)

    def keep(self, rows: list[int]) -> None:
        """Keep the live rows ``rows`` (in increasing order); the others' slots are refilled from the tail."""
        import torch

        n = len(self)
        if len(rows) == n:
            return
        m = len(rows)
        dead = sorted(set(range(n)) - set(rows))
        order = list(range(m))
        for hole, mover in zip([d for d in dead if d < m], [r for r in rows if r >= m]):
            order[hole] = mover
            for buf in self.buffers:
                for t in buf:
                    t[hole].copy_(t[mover])
        pick = lambda seq: [seq[r] for r in order]
        self.requests, self.tokens, self.logprobs = pick(self.requests), pick(self.tokens), pick(self.logprobs)
        self.first, self.pos, self.soft = pick(self.first), pick(self.pos), pick(self.soft)
        index = torch.as_tensor(order, dtype=torch.long, device=self.tensors["n"].device)
        self.tensors = {k: v.index_select(0, index) for k, v in self.tensors.items()}


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

    def cross_kv(self, hidden, out=None, order=None) -> list[tuple[Any, Any]]:
        """Cross-attention keys and values of every layer, contiguous ``[B, H, S, d]``: written into ``out`` (per
        layer a pair of such buffers; each projection is copied once, head-major, into its place), rows in
        ``order`` (a ``[B]`` index; None: as they come), or new. The projections run on the whole batch ``hidden``
        whatever the order (the same values, bit for bit, as for any other order)."""
        import torch

        if out is None:
            shape = (hidden.shape[0], self.heads, hidden.shape[1], self.head_dim)
            out = [(torch.empty(shape, dtype=hidden.dtype, device=hidden.device),
                    torch.empty(shape, dtype=hidden.dtype, device=hidden.device)) for _ in self.decoder.layers]
        for layer, (k, v) in zip(self.decoder.layers, out):
            att = layer.encoder_attn
            for proj, buf in ((att.k_proj, k), (att.v_proj, v)):
                x = proj(hidden)
                buf.copy_(self._split(x if order is None else x.index_select(0, order)))
        return out

    def _layers(self, h, cache, cross, write, attend):
        """Run the decoder layers on ``h`` [B, L, D]: ``write(k_cache, k_new)`` stores the new keys/values,
        ``attend(q, k_cache, v_cache)`` is the self-attention."""
        import torch
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
            # a few queries against 1,500 keys: two matrix products beat the fused kernel on a CPU (~20%)
            o = torch.matmul(torch.softmax(torch.matmul(q, ck.transpose(-1, -2)), dim=-1), cv)
            h = h + catt.out_proj(o.transpose(1, 2).reshape(h.shape))
            x = layer.final_layer_norm(h)
            h = h + layer.fc2(layer.activation_fn(layer.fc1(x)))
        return F.linear(self.decoder.layer_norm(h), self.out_weight)

    def prefill(self, ids, cache, cross):
        """All prompt positions of fresh rows (same prompt length): logits ``[B, P, V]``."""
        import torch.nn.functional as F

        P = ids.shape[1]
        h = self.decoder.embed_tokens(ids) + self.decoder.embed_positions.weight[:P]

        def write(c, new):
            c[:, :, :P] = new

        def attend(q, k, v):
            return F.scaled_dot_product_attention(q, k[:, :, :P], v[:, :, :P], is_causal=P > 1, scale=1.0)

        return self._layers(h, cache, cross, write, attend)

    def step(self, ids, pos: list[int], cache, cross):
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

    def forward(self, ids, pos: list[int], cache, cross):
        """``L`` new tokens per row (``ids`` [B, L]), row ``b`` at positions ``pos[b] .. pos[b] + L - 1``, each
        attending to its row's earlier positions: logits ``[B, L, V]`` (one pass verifies several draft tokens)."""
        import torch
        import torch.nn.functional as F

        device = ids.device
        B, L = ids.shape
        at = torch.as_tensor(pos, dtype=torch.long, device=device)[:, None] + torch.arange(L, device=device)
        end = max(pos) + L
        h = self.decoder.embed_tokens(ids) + self.decoder.embed_positions.weight[at]
        rows = torch.arange(B, device=device)[:, None]

        def write(c, new):
            c[rows, :, at] = new.transpose(1, 2)

        mask = (torch.arange(end, device=device)[None, None] <= at[:, :, None])[:, None]

        def attend(q, k, v):
            return F.scaled_dot_product_attention(q, k[:, :, :end], v[:, :, :end], attn_mask=mask, scale=1.0)

        return self._layers(h, cache, cross, write, attend)

    # ------------------------------------------------------------------------------------------ rules

    def apply_rules(self, scores, t: dict[str, Any], any_first: bool, any_timestamps: bool) -> None:
        """In place on ``scores`` [B, V], each row by its own state (``t``: the pool's tensors). Masks are
        applied to the slices they concern (text part, timestamp part), not built over the whole vocabulary.
        ``any_first`` / ``any_timestamps``: whether some row is at its first token / decodes timestamps
        (known on the host: asking the tensors would wait for the device every step)."""
        import torch

        neg = float("-inf")
        n, ts = t["n"], t["ts"]
        first = n == 0
        if self.begin_suppress and any_first:
            scores[:, self.begin_suppress] = scores[:, self.begin_suppress].masked_fill(first[:, None], neg)
        if self.suppress:
            scores[:, self.suppress] = neg
        if self.tb is None or not any_timestamps:
            return
        tb = self.tb
        text, stamps = scores[:, :tb], scores[:, tb:]  # views
        last, pen, last_ts = t["last"], t["pen"], t["last_ts"]
        later = ts & ~first
        last_is_ts = last >= tb
        pen_is_ts = torch.where(n >= 2, pen >= tb, torch.ones_like(last_is_ts))
        # after a closed pair of timestamps: text or end-of-text; after an opening one: a timestamp or end-of-text
        stamps.masked_fill_((later & last_is_ts & pen_is_ts)[:, None], neg)
        scores[:, : self.eos].masked_fill_((later & last_is_ts & ~pen_is_ts)[:, None], neg)
        # timestamps never decrease (and a closing one may repeat the opening one)
        floor = torch.where(last_is_ts & ~pen_is_ts, last_ts, last_ts + 1)
        floor = torch.where(last_ts >= 0, floor, torch.full_like(floor, tb))
        stamp_ids = torch.arange(tb, scores.shape[1], device=scores.device)
        stamps.masked_fill_(later[:, None] & (stamp_ids[None] < floor[:, None]), neg)
        # the first generated token is a timestamp, not too late
        start = ts & first
        text.masked_fill_(start[:, None], neg)
        if self.max_initial is not None:
            stamps[:, int(self.max_initial) + 1 :].masked_fill_(start[:, None], neg)
        scores[:, self.no_ts].masked_fill_(ts, neg)
        # a timestamp whenever the timestamps together are more probable than any single text token
        logp = torch.log_softmax(scores, dim=-1)
        ts_lp = logp[:, tb:].logsumexp(dim=-1)
        text_max = logp[:, :tb].max(dim=-1).values
        text.masked_fill_((ts & (ts_lp > text_max))[:, None], neg)

    # ------------------------------------------------------------------------------------------ decoding

    def limit(self, prompt_len: int) -> int:
        limit = self.max_positions
        if self.max_new_tokens is not None:
            limit = min(limit, prompt_len + int(self.max_new_tokens))
        elif self.max_length is not None:  # as Whisper's generate: max_length plus the (capped) prompt
            limit = min(limit, int(self.max_length) + min(self.max_positions // 2 - 1, prompt_len))
        if limit <= prompt_len:
            raise ValueError(f"no room to generate: prompt of {prompt_len} tokens, limit {limit}")
        return limit

    def admit(self, pool: DecoderPool, requests: list[DecodeRequest]) -> None:
        """Prefill new rows into the pool's free slots, ready to choose their first token."""
        import torch

        if any(r.timestamps for r in requests) and self.tb is None:
            raise ValueError("the generation config has no no_timestamps_token_id: no timestamps")
        if len(pool) + len(requests) > pool.capacity:
            raise ValueError(f"{len(requests)} new rows do not fit a pool of {len(pool)}/{pool.capacity}")
        hidden = torch.stack([torch.as_tensor(r.hidden) for r in requests])
        device, dtype = hidden.device, hidden.dtype
        cross_shape = (self.heads, hidden.shape[1], self.head_dim)
        pool.allocate(len(self.decoder.layers), (self.heads, self.max_positions, self.head_dim),
                      (cross_shape, cross_shape), device, dtype)
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(len(r.prompt), []).append(i)
        if min(groups) < 1:
            raise ValueError("empty decoder prompt")
        # the new rows take the next free slots, grouped by prompt length; their cross-attention keys and values
        # go straight into the pool's buffers
        order = [i for _, idx in sorted(groups.items()) for i in idx]
        self.cross_kv(hidden, out=pool.views(len(pool), len(pool) + len(requests))[1],
                      order=None if order == sorted(order) else torch.as_tensor(order, dtype=torch.long, device=device))
        for P, idx in sorted(groups.items()):
            start, stop = len(pool), len(pool) + len(idx)
            cache, cross = pool.views(start, stop)
            for k, v in cache:
                # zeros, not stale values: a masked position still multiplies its value by a zero weight, and
                # 0 * NaN (whatever the slot held) would poison rows that sit at earlier positions than others
                k.zero_()
                v.zero_()
            ids = torch.as_tensor([list(requests[i].prompt) for i in idx], dtype=torch.long, device=device)
            logits = self.prefill(ids, cache, cross)
            limits = [self.limit(P) for _ in idx]
            none = torch.full((len(idx),), -1, dtype=torch.long, device=device)
            pool.append([requests[i] for i in idx], list(logits[:, 0].float().clone().unbind(0)), [P] * len(idx), {
                "ts": torch.as_tensor([requests[i].timestamps for i in idx], dtype=torch.bool, device=device),
                "n": torch.zeros(len(idx), dtype=torch.long, device=device),
                "limit": torch.as_tensor(limits, dtype=torch.long, device=device) - P,  # tokens a row may generate
                "last": none, "pen": none.clone(), "last_ts": none.clone(),
                "logits": logits[:, -1].float(),
            })

    def add_soft_labels(self, pool: DecoderPool, logits, soft_labels: tuple[int, float], rows=None) -> None:
        """Append, for each live row (or each of ``rows``), the top-k of its raw ``logits`` at temperature T."""
        from hf_distill.speech.soft_labels import topk_from_logits

        top = topk_from_logits(logits, soft_labels[0], soft_labels[1])
        for r, row in enumerate(zip(*top)):
            if rows is None or r in rows:
                pool.soft[r].append(row)

    def choose(self, scores, t: dict[str, Any], pool: DecoderPool, active=None):
        """The next token of each row from its ``scores`` [B, V] (changed in place by the decoding rules), its
        log-probability under the rules, and whether the row is done (end-of-text or its token limit); the rows'
        state ``t`` moves on by that token (only the ``active`` rows, a [B] bool mask, when given)."""
        import torch

        self.apply_rules(scores, t, any_first=any(not tokens for tokens in pool.tokens),
                         any_timestamps=any(r.timestamps for r in pool.requests))
        nxt = scores.argmax(dim=-1)
        lp = torch.log_softmax(scores, dim=-1).gather(-1, nxt[:, None])[:, 0]
        if active is None:
            t["n"] = t["n"] + 1
            t["pen"], t["last"] = t["last"], nxt
            moved = t["ts"]
        else:
            t["n"] = t["n"] + active.long()
            t["pen"], t["last"] = torch.where(active, t["last"], t["pen"]), torch.where(active, nxt, t["last"])
            moved = t["ts"] & active
        if self.tb is not None:
            t["last_ts"] = torch.where(moved & (nxt >= self.tb), nxt, t["last_ts"])
        return nxt, lp, (nxt == self.eos) | (t["n"] >= t["limit"])

    def stream(self, requests: Iterable[DecodeRequest] | Iterator[DecodeRequest], capacity: int,
               refill: int | None = None, soft_labels: tuple[int, float] | None = None) -> Iterator[DecodeResult]:
        """Decode ``requests`` (an iterable, or a callable ``take(n)`` returning up to ``n`` requests),
        ``capacity`` rows at a time; rows join whenever at least ``refill`` slots are free (default: a
        quarter of the capacity) or the pool is empty. Results come in finishing order. ``take`` is asked
        again after an empty answer (handling a result may create work); decoding ends when the pool is
        empty and ``take`` has nothing. ``soft_labels=(k, T)``: each result also carries, for every generated
        token, the top-k of the teacher's raw distribution at temperature ``T`` where it chose that token (no
        decoding rule applied: the distribution a student learns), from the same pass."""
        import torch

        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        refill = max(1, capacity // 4) if refill is None else max(1, int(refill))
        take = as_take(requests)
        pool = DecoderPool(capacity)
        while True:
            free = capacity - len(pool)
            if free > 0 and (free >= refill or not len(pool)):
                new = take(free)  # asked again even after an empty answer: results may create more work
                if new:
                    self.admit(pool, list(new))
            if not len(pool):
                return
            t = pool.tensors
            logits = t["logits"]
            if soft_labels is not None:
                self.add_soft_labels(pool, logits, soft_labels)
            nxt, lp, done = self.choose(logits, t, pool)
            # one device-to-host transfer per step: chosen tokens, their log-probabilities, finished rows
            host = torch.stack([nxt.double(), lp.double(), done.double()]).tolist()
            keep = []
            for r, (tok, v, d) in enumerate(zip(*host)):
                pool.tokens[r].append(int(tok))
                pool.logprobs[r].append(v)
                if d:
                    yield pool.result(r, soft_labels is not None)
                else:
                    keep.append(r)
            pool.keep(keep)
            if not len(pool):
                continue
            t = pool.tensors
            cache, cross = pool.views(0, len(pool))
            t["logits"] = self.step(t["last"], pool.pos, cache, cross).float()
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

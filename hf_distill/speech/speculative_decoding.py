"""Speculative greedy Whisper decoding: a small draft proposes tokens, the teacher verifies them in one pass.

Decoding a Whisper teacher is one decoder pass per token. Here a smaller Whisper decoder sharing the teacher's
tokenizer (e.g. a distilled student) proposes the next ``draft_tokens`` tokens of every row, one cheap step each,
and the teacher reads the token it chose and all the proposals in **one** pass (its key/value cache gets them
all): where its own greedy choice, under the decoding rules, equals the proposal, the proposal is kept and the
next one is checked; at the first difference the teacher's choice is taken and the rest dropped. So the output
is the teacher's greedy output, token for token (what :class:`~hf_distill.speech.greedy_decoding.GreedyWhisperDecoder`
gives: same rules, log-probabilities, first-position logits, soft labels); only its speed depends on the draft.
Rows keep the pool of the greedy decoder (continuous batching): each row at its own position, both caches
moved together. A draft accepted less often than ``min_acceptance`` (judged after ``judge_after`` proposals)
stops proposing: plain greedy steps from then on, the same output. :attr:`SpeculativeWhisperDecoder.stats` counts the proposals checked (a row's proposals after a
rejected one, or after its end, are not) and the accepted ones, the teacher's passes and the tokens.
"""

from __future__ import annotations

from collections.abc import Iterator

from hf_distill.speech.greedy_decoding import (
    DecodeRequest,
    DecodeResult,
    DecoderPool,
    GreedyWhisperDecoder,
    as_take,
)

__all__ = ["SpeculativeWhisperDecoder", "check_draft"]


def check_draft(teacher, draft) -> None:
    """Raise ValueError unless ``draft`` (a Whisper model) can propose tokens for ``teacher``: the same vocabulary
    and special tokens."""
    tc, dc, tg, dg = teacher.config, draft.config, teacher.generation_config, draft.generation_config
    same = {"vocabulary size": (tc.vocab_size, dc.vocab_size),
            "start of transcript": (tg.decoder_start_token_id, dg.decoder_start_token_id),
            "end of text": (tg.eos_token_id, dg.eos_token_id)}
    differ = [f"{what} {a} vs {b}" for what, (a, b) in same.items() if a != b]
    if differ:
        raise ValueError(f"the draft model does not share the teacher's tokenizer ({'; '.join(differ)}): give a "
                         "smaller Whisper with the teacher's vocabulary, e.g. a student distilled from it")


class SpeculativeWhisperDecoder:
    """:meth:`stream` as :meth:`GreedyWhisperDecoder.stream`, each teacher pass checking ``draft_tokens`` tokens
    that ``draft_model`` proposed. A request's ``draft_hidden`` is the draft's encoder output (None: the teacher's,
    for a draft that shares the teacher's encoder)."""

    def __init__(self, model, draft_model, draft_tokens: int = 4, max_new_tokens: int | None = None,
                 min_acceptance: float = 0.3, judge_after: int = 200):
        check_draft(model, draft_model)
        if draft_tokens < 1:
            raise ValueError("draft_tokens must be >= 1")
        self.teacher = GreedyWhisperDecoder(model, max_new_tokens=max_new_tokens)
        self.draft = GreedyWhisperDecoder(draft_model)  # its model; the rules are the teacher's
        self.k = int(draft_tokens)
        # a draft that is rarely right costs more than it saves: after ``judge_after`` proposals checked, one
        # accepted less often than ``min_acceptance`` proposes no more (plain greedy steps from then on)
        self.min_acceptance, self.judge_after = float(min_acceptance), int(judge_after)
        self.stats = {"proposed": 0, "accepted": 0, "teacher_passes": 0, "tokens": 0, "drafting_stopped": False}

    @property
    def acceptance_rate(self) -> float | None:
        return self.stats["accepted"] / self.stats["proposed"] if self.stats["proposed"] else None

    def stream(self, requests, capacity: int, refill: int | None = None,
               soft_labels: tuple[int, float] | None = None) -> Iterator[DecodeResult]:
        import torch

        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        refill = max(1, capacity // 4) if refill is None else max(1, int(refill))
        take = as_take(requests)
        pool, draft_pool = DecoderPool(capacity), DecoderPool(capacity)
        teacher = self.teacher
        while True:
            free = capacity - len(pool)
            if free > 0 and (free >= refill or not len(pool)):
                new = list(take(free))
                if new:
                    teacher.admit(pool, new)  # both pools order the new rows alike (by prompt length)
                    self.draft.admit(draft_pool, [DecodeRequest(r.key, r.hidden if r.draft_hidden is None
                                                                else r.draft_hidden, r.prompt, r.timestamps)
                                                  for r in new])
            if not len(pool):
                return
            done_rows = yield from self._iteration(pool, draft_pool, soft_labels, torch)
            keep = [r for r in range(len(pool)) if r not in done_rows]
            pool.keep(keep)
            draft_pool.keep(keep)

    def _propose(self, pool: DecoderPool, draft_pool: DecoderPool, first, k: int, torch):
        """The draft's ``k`` tokens after each row's ``first`` token ([B, k]), under the teacher's rules; the draft's
        cache then holds ``first`` and the proposals (k + 1 positions from the row's position)."""
        t = {key: v.clone() for key, v in pool.tensors.items() if key != "logits"}  # moved past ``first`` already
        cache, cross = draft_pool.views(0, len(draft_pool))
        fed, out = first, []
        for j in range(k + 1):
            logits = self.draft.step(fed, [p + j for p in pool.pos], cache, cross).float()
            if j < k:
                fed = self.teacher.choose(logits, t, pool)[0]
                out.append(fed)
        return torch.stack(out, dim=1)

    def _iteration(self, pool: DecoderPool, draft_pool: DecoderPool, soft_labels, torch):
        """One teacher pass for every live row: the token it chose from its logits, then the proposals it accepts.
        Yields the results of the rows that finished; returns their indices."""
        teacher, t = self.teacher, pool.tensors
        B = len(pool)
        k = max(0, min(self.k, min(teacher.max_positions, self.draft.max_positions) - 1 - max(pool.pos)))
        if self.stats["drafting_stopped"]:
            k = 0
        if soft_labels is not None:
            teacher.add_soft_labels(pool, t["logits"], soft_labels)
        first, lp, done = teacher.choose(t["logits"], t, pool)
        chosen = [[tok] for tok in first.tolist()]
        logprobs = [[v] for v in lp.tolist()]
        accepted = torch.zeros(B, dtype=torch.long, device=first.device)
        cache, cross = pool.views(0, B)
        if k == 0:
            logits = teacher.step(first, pool.pos, cache, cross).float()[:, None]
        else:
            drafts = self._propose(pool, draft_pool, first, k, torch)
            logits = teacher.forward(torch.cat([first[:, None], drafts], dim=1), pool.pos, cache, cross).float()
            active = ~done
            for j in range(k):
                if not bool(active.any()):
                    break
                self.stats["proposed"] += int(active.sum())  # proposals checked (none after a row's end)
                scores = logits[:, j].clone()
                rows = set(active.nonzero()[:, 0].tolist())
                if soft_labels is not None:
                    teacher.add_soft_labels(pool, scores, soft_labels, rows=rows)
                before = {key: t[key] for key in ("n", "pen", "last", "last_ts")}
                nxt, lp, fin = teacher.choose(scores, t, pool, active=active)
                match = active & (nxt == drafts[:, j])
                rejected = active & ~match  # the teacher's own choice there is made again next time, from these logits
                for key, value in before.items():
                    t[key] = torch.where(rejected, value, t[key])
                host = torch.stack([match.double(), nxt.double(), lp.double(), (match & fin).double()]).tolist()
                for r, (m, tok, v, f) in enumerate(zip(*host)):
                    if m:
                        chosen[r].append(int(tok))
                        logprobs[r].append(v)
                    elif r in rows and soft_labels is not None:
                        pool.soft[r].pop()
                accepted = accepted + match.long()
                done = done | (match & fin)
                active = match & ~fin
            self.stats["accepted"] += int(accepted.sum())
            if self.stats["proposed"] >= self.judge_after and self.acceptance_rate < self.min_acceptance:
                self.stats["drafting_stopped"] = True
        t["logits"] = logits[torch.arange(B, device=logits.device), accepted]
        self.stats["teacher_passes"] += 1
        done_rows = set()
        for r, d in enumerate(done.tolist()):
            pool.tokens[r] += chosen[r]
            pool.logprobs[r] += logprobs[r]
            self.stats["tokens"] += len(chosen[r])
            if d:
                done_rows.add(r)
                yield pool.result(r, soft_labels is not None)
        pool.pos = [p + 1 + a for p, a in zip(pool.pos, accepted.tolist())]
        draft_pool.pos = list(pool.pos)
        return done_rows

"""Student architecture search under a budget: depth x width x heads, short distillation runs, successive halving.

1. **Candidates**: every combination of the given layer counts, head counts, FFN widths and hidden
   sizes that the teacher's family can take, each built from the teacher (evenly spaced layers,
   then width pruning on calibration data: :mod:`hf_distill.students.pruning`).
2. **Budget**: a candidate is kept only if its measured latency (median forward time of a fixed
   batch on this machine, the machine that runs the search) or its parameter count is within
   the budget. Every candidate on the output front respects it.
3. **Successive halving** (Jamieson & Talwalkar 2016): all kept candidates are distilled for a
   few steps and scored; the best ``1 / eta`` go on with ``eta`` times the steps, until one is
   left or the rounds run out. Each candidate keeps training from where it stopped.
4. **Pareto front**: the candidates that no other beats on both score and latency.

The search is generic: the caller gives ``train(candidate, steps)`` and ``score(candidate)``
(e.g. distillation from cached teacher logits and held-out accuracy); :func:`successive_halving`
and :func:`pareto_front` are pure functions that the tests check on their own.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..modeling import count_parameters
from ..modeling import num_layers as count_layers


@dataclass
class Candidate:
    """One student shape and what the search measured of it."""

    layers: int
    heads: int
    intermediate: int
    hidden: int
    parameters: int = 0
    latency_ms: float = math.nan
    score: float = math.nan
    tiebreak: float = 0.0  # orders equal scores (higher first), e.g. minus a held-out loss
    steps: int = 0
    rounds: int = 0
    model: Any = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return f"L{self.layers}-H{self.heads}-F{self.intermediate}-D{self.hidden}"

    def row(self) -> dict:
        return {"name": self.name, "layers": self.layers, "heads": self.heads, "intermediate": self.intermediate,
                "hidden": self.hidden, "parameters": self.parameters, "latency_ms": round(self.latency_ms, 3),
                "score": self.score, "tiebreak": self.tiebreak, "steps": self.steps, "rounds": self.rounds}


def candidate_shapes(teacher, *, layers: Sequence[int], heads: Sequence[int], intermediate: Sequence[int],
                     hidden: Sequence[int] | None = None) -> list[Candidate]:
    """Every combination the teacher's family can take (BERT: hidden = heads x head size, so ``hidden`` is
    derived from the heads unless given)."""
    config = teacher.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    bert = getattr(config, "model_type", None) == "bert"
    out = []
    for n_layers, n_heads, ffn in itertools.product(layers, heads, intermediate):
        widths = [n_heads * head_dim] if bert or not hidden else hidden
        for width in widths:
            if not (1 <= n_layers <= count_layers(teacher) and 1 <= n_heads <= config.num_attention_heads
                    and 1 <= ffn <= config.intermediate_size and 1 <= width <= config.hidden_size):
                raise ValueError(f"candidate L{n_layers}-H{n_heads}-F{ffn}-D{width} is larger than the teacher "
                                 f"({count_layers(teacher)} layers, {config.num_attention_heads} heads, "
                                 f"{config.intermediate_size} FFN, {config.hidden_size} hidden)")
            out.append(Candidate(n_layers, n_heads, ffn, width))
    if not out:
        raise ValueError("the search space is empty: give at least one value for layers, heads and intermediate")
    return out


def build_candidate(teacher, candidate: Candidate, calibration: list[dict]):
    """The candidate's student: evenly spaced teacher layers, then width pruning (weights copied)."""
    from .build import build_student_with_info
    from .pruning import prune_width

    if candidate.layers < count_layers(teacher):
        student, _ = build_student_with_info(teacher, num_layers=candidate.layers)
    else:
        student = teacher
    config = student.config
    if (candidate.heads, candidate.intermediate, candidate.hidden) != (
            config.num_attention_heads, config.intermediate_size, config.hidden_size):
        student, _ = prune_width(student, calibration, heads=candidate.heads, intermediate=candidate.intermediate,
                                 hidden=candidate.hidden)
    elif student is teacher:
        import copy

        student = copy.deepcopy(teacher)
    return student


@torch.no_grad()
def measure_latency_ms(model, batch: dict, *, repeats: int = 7, warmup: int = 2) -> float:
    """Median wall time of a forward pass of ``batch``, in milliseconds, on this machine."""
    model.eval()
    for _ in range(warmup):
        model(**batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(**batch)
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def within_budget(candidates: list[Candidate], *, max_latency_ms: float | None = None,
                  max_parameters: int | None = None) -> list[Candidate]:
    """The candidates whose measured latency and parameter count are within the budget."""
    if max_latency_ms is None and max_parameters is None:
        raise ValueError("give a budget: max_latency_ms and/or max_parameters")
    kept = [c for c in candidates if (max_latency_ms is None or c.latency_ms <= max_latency_ms)
            and (max_parameters is None or c.parameters <= max_parameters)]
    if not kept:
        best = min(candidates, key=lambda c: (c.latency_ms, c.parameters))
        raise ValueError(f"no candidate is within the budget (latency <= {max_latency_ms} ms, parameters <= "
                         f"{max_parameters}); the smallest measured {best.latency_ms:.2f} ms and {best.parameters:,} "
                         "parameters: widen the budget or add smaller shapes")
    return kept


def successive_halving(candidates: list[Candidate], train: Callable[[Candidate, int], None],
                       score: Callable[[Candidate], float], *, min_steps: int, eta: int = 2,
                       rounds: int | None = None, log: Callable[[str], None] | None = None,
                       tiebreak: Callable[[Candidate], float] | None = None) -> list[Candidate]:
    """Train every candidate ``min_steps`` steps, keep the best ``1/eta`` (higher score is better), train
    those ``eta`` times longer, and so on. Returns every candidate with its last score and steps; the winner
    is the one with the most rounds and the best score. ``tiebreak`` (higher is better, read after each
    score) orders candidates with equal scores, e.g. minus a held-out loss when the score is an accuracy."""
    if eta < 2 or min_steps < 1:
        raise ValueError(f"successive halving needs eta >= 2 and min_steps >= 1, got eta={eta}, min_steps={min_steps}")
    alive = list(candidates)
    rounds = rounds if rounds is not None else max(1, math.ceil(math.log(max(len(alive), 1), eta)) + 1)
    steps = min_steps
    for r in range(rounds):
        for c in alive:
            train(c, steps - c.steps)  # continue from where it stopped
            c.steps = steps
            c.score = float(score(c))
            c.tiebreak = float(tiebreak(c)) if tiebreak else 0.0
            c.rounds = r + 1
        alive.sort(key=lambda c: (c.score, c.tiebreak), reverse=True)
        if log:
            log(f"round {r + 1}: {len(alive)} candidates at {steps} steps, best {alive[0].name} = {alive[0].score:.4f}")
        if len(alive) == 1:
            break
        alive = alive[:max(1, len(alive) // eta)]
        steps *= eta
    return sorted(candidates, key=lambda c: (-c.rounds, -c.score, -c.tiebreak))


def pareto_front(candidates: list[Candidate]) -> list[Candidate]:
    """Candidates that no other candidate beats on both score (higher) and latency (lower), by latency."""
    front = []
    for c in candidates:
        dominated = any(o is not c and o.score >= c.score and o.latency_ms <= c.latency_ms
                        and (o.score > c.score or o.latency_ms < c.latency_ms) for o in candidates)
        if not dominated and not math.isnan(c.score):
            front.append(c)
    return sorted(front, key=lambda c: c.latency_ms)


def describe(candidates: list[Candidate], front: list[Candidate]) -> str:
    """The search as a Markdown table (front members marked)."""
    names = {c.name for c in front}
    lines = ["| candidate | params | latency (ms) | score | steps | on the front |", "| --- | ---: | ---: | ---: | ---: | --- |"]
    for c in sorted(candidates, key=lambda c: c.latency_ms):
        lines.append(f"| {c.name} | {c.parameters:,} | {c.latency_ms:.2f} | {c.score:.4f} | {c.steps} | "
                     f"{'yes' if c.name in names else ''} |")
    return "\n".join(lines) + "\n"


def prepare_candidates(teacher, candidates: list[Candidate], calibration: list[dict],
                       latency_batch: dict | None) -> None:
    """Build every candidate and count its parameters (in place); with ``latency_batch``, measure each one's
    latency on its own (a caller that times them together, interleaved, passes None and sets ``latency_ms``)."""
    for c in candidates:
        c.model = build_candidate(teacher, c, calibration)
        c.parameters = count_parameters(c.model)
        if latency_batch is not None:
            c.latency_ms = measure_latency_ms(c.model, latency_batch)

"""Completions sampled for a batch's prompts, and the batch rebuilt around them.

On-policy distillation (GKD, Agarwal et al. 2024) trains the student on its own samples, scored by
the teacher on the same tokens; sequence-level KD (Kim & Rush 2016) on the teacher's generations.
Both need three pieces, kept here as plain functions of tensors and models:

* :func:`choose_source`: which model writes a micro-batch's completions (``"student"`` with
  probability ``lmbda``, else ``"teacher"`` under ``seq_kd``, else ``"data"``), drawn from the run's
  seed, the optimiser step and the micro-batch index, so a rerun or a resumed run draws the same;
* :func:`sample_completions`: a decoding loop with the KV cache and no gradient, one forward pass of
  the prompts (logits of the last position only) then one token per step; a row that emits an
  end-of-sequence token leaves the batch (with its KV cache), and decoding stops when none is left.
  Each row samples from its own generator (:func:`row_generators`), so a row's completion does not
  depend on which other rows share its micro-batch or process (batch 4, 2 micro-batches of 2 and 2
  processes x 2 sample the same tokens). The draws are those of ``model.generate(do_sample=True,
  top_k=..., top_p=..., temperature=...)`` after ``torch.manual_seed(row_seed(...))`` for a batch of
  one prompt (tested);
* :func:`rebuild_batch`: prompt + completion, right-padded to the longest row; ``labels`` are -100
  on the prompt, on padding and after the first end-of-sequence token.

Public API::

    choose_source(lmbda, seq_kd, seed, step, micro_batch) -> str
    row_seed(seed, step, row) -> int
    row_generators(seed, step, first_row, rows, device) -> list[torch.Generator]
    sample_completions(model, prompt_ids, prompt_mask, *, max_new_tokens, temperature=1.0, top_p=1.0,
                       top_k=0, eos_token_ids=(), pad_token_id=0, generators=None) -> (tokens, lengths)
    left_align(ids, mask) -> (ids, mask)
    rebuild_batch(prompt_ids, prompt_mask, completions, lengths, pad_token_id) -> dict
    end_of_sequence_ids(model, tokenizer=None) -> list[int]
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Sequence

import torch

from ..losses import IGNORE_INDEX
from ..modeling import forward_parameters

__all__ = [
    "choose_source",
    "end_of_sequence_ids",
    "left_align",
    "rebuild_batch",
    "row_generators",
    "row_seed",
    "sample_completions",
]


def _mixed_seed(*parts) -> int:
    """A 63-bit seed from ``parts``, the same in every process and Python run (no ``hash()`` salt)."""
    digest = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def choose_source(lmbda: float, seq_kd: bool, seed: int, step: int, micro_batch: int) -> str:
    """Who writes the completions of micro-batch ``micro_batch`` of optimiser step ``step``: ``"student"``
    with probability ``lmbda``, else ``"teacher"`` when ``seq_kd``, else ``"data"`` (the dataset's).
    Every process draws the same, so processes generate in the same steps and wait for each other least."""
    if lmbda >= 1.0 or (lmbda > 0.0 and random.Random(_mixed_seed("source", seed, step, micro_batch)).random() < lmbda):
        return "student"
    return "teacher" if seq_kd else "data"


def row_seed(seed: int, step: int, row: int) -> int:
    """The seed of row ``row`` of optimiser step ``step``; rows are counted over the whole step, as the
    sampler orders them (micro-batch by micro-batch, process by process within one)."""
    return _mixed_seed("row", seed, step, row)


def row_generators(seed: int, step: int, first_row: int, rows: int, device) -> list[torch.Generator]:
    """One generator per row, seeded with :func:`row_seed` for rows ``first_row`` .. ``first_row + rows - 1``."""
    generators = []
    for row in range(first_row, first_row + rows):
        generator = torch.Generator(device=device)
        generator.manual_seed(row_seed(seed, step, row))
        generators.append(generator)
    return generators


def end_of_sequence_ids(model, tokenizer=None) -> list[int]:
    """The tokens that end a completion: the model's generation config's and config's ``eos_token_id``
    (an id or a list) and the tokenizer's ``eos_token_id``."""
    ids: list[int] = []
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        for item in (value if isinstance(value, (list, tuple)) else [value]):
            if item is not None and int(item) not in ids:
                ids.append(int(item))
    return ids


def left_align(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts padded on the left (the last column real in every row); right-padded ones are moved over."""
    if bool(mask[:, -1].all()):
        return ids, mask
    order = torch.argsort(mask.long(), dim=1, stable=True)  # padding first, then the tokens in their order
    return ids.gather(1, order), mask.gather(1, order)


def _filtered(logits: torch.Tensor, temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    """Logits after temperature, top-k and top-p (nucleus) filtering, in that order (as transformers' warpers)."""
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(logits, dim=-1)  # ascending
        drop = ordered.softmax(-1).cumsum(-1) <= 1.0 - top_p
        drop[..., -1] = False  # the most likely token always stays
        logits = logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    return logits


def _next_tokens(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
                 generators: Sequence[torch.Generator] | None) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    probs = _filtered(logits.float(), temperature, top_p, top_k).softmax(-1)
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(-1)
    return torch.cat([torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(generators)])


@torch.no_grad()
def sample_completions(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor | None = None, *,
                       max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                       eos_token_ids: Iterable[int] = (), pad_token_id: int = 0,
                       generators: Sequence[torch.Generator] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample up to ``max_new_tokens`` tokens after each (left-padded) prompt; ``temperature=0`` is greedy.

    Returns ``tokens`` (batch, longest completion), ``pad_token_id`` after each row's end, and
    ``lengths`` (batch,): tokens per row, the end-of-sequence token included. Runs ``model`` as it is
    (put it in eval mode first); ``generators`` (one per row) make the draws reproducible. Rows that
    have ended leave the batch (their KV cache entries are dropped), so the remaining steps compute
    only the rows still running.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    rows = prompt_ids.shape[0]
    if generators is not None and len(generators) != rows:
        raise ValueError(f"got {len(generators)} generators for {rows} prompts; give one per row")
    device = prompt_ids.device
    mask = torch.ones_like(prompt_ids) if prompt_mask is None else prompt_mask.to(device).long()
    prompt_ids, mask = left_align(prompt_ids, mask)
    positions = (mask.cumsum(-1) - 1).clamp_(min=0)
    accepted = forward_parameters(model)
    last_only = {"logits_to_keep": 1} if accepted is None or "logits_to_keep" in accepted else {}
    # transformers 5.24 calls the KV cache `cache` (`past_key_values` before, deprecated until 5.40).
    cache_name = "past_key_values" if accepted is not None and "past_key_values" in accepted else "cache"
    eos = torch.tensor(sorted(set(eos_token_ids)), device=device, dtype=prompt_ids.dtype)
    tokens = prompt_ids.new_full((rows, max_new_tokens), pad_token_id)
    lengths = torch.zeros(rows, dtype=torch.long, device=device)
    running = torch.arange(rows, device=device)  # the original row of each row still in the batch
    ended = torch.zeros(rows, dtype=torch.bool, device=device)  # in the batch although ended (see below)
    out = model(input_ids=prompt_ids, attention_mask=mask, position_ids=positions, use_cache=True, **last_only)
    position = positions[:, -1:]
    for t in range(max_new_tokens):
        chosen = _next_tokens(out.logits[:, -1, :], temperature, top_p, top_k, generators)
        live = running[~ended]
        tokens[live, t] = chosen[~ended]
        lengths[live] += 1
        if t == max_new_tokens - 1:
            break
        cache = getattr(out, "cache", None)
        cache = getattr(out, "past_key_values", None) if cache is None else cache
        if eos.numel():
            ended |= torch.isin(chosen, eos)
            if bool(ended.all()):
                break
            if hasattr(cache, "batch_select_indices") and bool(ended.any()):
                # Drop the rows that ended, KV cache included; a cache that cannot drop rows keeps them
                # running on padding, their draws discarded.
                keep = (~ended).nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                running, chosen, mask, position, ended = running[keep], chosen[keep], mask[keep], position[keep], \
                    ended[keep]
                if generators is not None:
                    generators = [generators[i] for i in keep.tolist()]
        chosen = chosen.masked_fill(ended, pad_token_id)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        position = position + 1
        out = model(input_ids=chosen[:, None], attention_mask=mask, position_ids=position, use_cache=True,
                    **{cache_name: cache})
    return tokens[:, : int(lengths.max())], lengths


def rebuild_batch(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completions: torch.Tensor,
                  lengths: torch.Tensor, pad_token_id: int) -> dict[str, torch.Tensor]:
    """``input_ids`` = prompt + the first ``lengths[i]`` completion tokens, right-padded to the longest row,
    with ``attention_mask`` and ``labels`` (-100 on the prompt and on padding); the prompts are kept as
    ``prompt_input_ids`` / ``prompt_attention_mask`` (left-padded)."""
    prompt_ids, prompt_mask = left_align(prompt_ids, prompt_mask.to(prompt_ids.device))
    completions, lengths = completions.to(prompt_ids.device), lengths.to(prompt_ids.device)
    prompt_lengths = prompt_mask.long().sum(-1)
    totals = prompt_lengths + lengths
    width = max(int(totals.max()), 1)
    joined = torch.cat([prompt_ids, completions], dim=1)
    columns = torch.arange(width, device=prompt_ids.device)[None, :]
    # Row r's prompt ends at column P - 1 of the left-padded prompts and its completion starts at P, so
    # output column j reads joined column j + P - prompt_length[r].
    source = (columns + (prompt_ids.shape[1] - prompt_lengths)[:, None]).clamp(max=joined.shape[1] - 1)
    real = columns < totals[:, None]
    input_ids = joined.gather(1, source).masked_fill(~real, pad_token_id)
    completion = real & (columns >= prompt_lengths[:, None])
    return {
        "input_ids": input_ids,
        "attention_mask": real.long(),
        "labels": input_ids.masked_fill(~completion, IGNORE_INDEX),
        "prompt_input_ids": prompt_ids,
        "prompt_attention_mask": prompt_mask.long(),
    }

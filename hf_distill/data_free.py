"""Data-free distillation: a transfer set synthesised without the training corpus.

* For classifiers, a causal language model writes short texts from generic prompts
  (:data:`GENERIC_PROMPTS`, e.g. "Write a short news article."); the classifier teacher labels them
  (its logits, soft targets) and the student trains on those rows only.
  :func:`synthesize_texts` samples the texts in seeded batches, appends each finished batch to
  ``<folder>/partial.jsonl`` (an interrupted run resumes after the last complete batch) and saves the
  whole set as a ``datasets`` dataset in ``<folder>/dataset`` with ``prompt``, ``text`` and ``seed``
  columns and ``<folder>/settings.json``; a later call with the same settings loads it, with other
  settings it refuses (delete the folder or change it).
* For causal LMs, two ways to train on the teacher's own generations:

  - a corpus sampled once: the teacher itself writes texts from generic or empty prompts
    (:func:`prompt_set`, :func:`synthesize_texts`: stored, inspectable, reused by a rerun) and
    :func:`synthetic_blocks` packs them into training blocks exactly like real documents, so the student
    trains on them with the same loss, steps and tokens as on real text (``recipes/causal_lm.py
    --data_free true``);
  - :func:`prompt_rows` turns the prompts into prompt-only rows for
    :class:`hf_distill.lm.trainer.CausalLMDistillationTrainer` with ``seq_kd=True``: the teacher writes
    every completion during training (new samples every step, at a teacher generation per step).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

GENERIC_PROMPTS = (
    "Write a short news article.",
    "Write a short newspaper report.",
    "Write the opening paragraphs of a news story.",
    "Write a short blog post.",
    "Write a short magazine article.",
    "Write a short opinion column.",
    "Write a short press release.",
    "Write a paragraph from an encyclopedia.",
    "Write a short report.",
    "Write a short story.",
    "Write a short email to a colleague.",
    "Write a short review.",
)

SETTINGS_FILE = "settings.json"
PARTIAL_FILE = "partial.jsonl"
DATASET_DIR = "dataset"


def check_prompts(prompts: Sequence[str], *, allow_empty: bool = False) -> list[str]:
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given: pass at least one prompt (e.g. hf_distill.data_free.GENERIC_PROMPTS)")
    bad = [p for p in prompts if not isinstance(p, str) or (not p.strip() and not (allow_empty and p == ""))]
    if bad:
        raise ValueError(f"prompts must be non-empty strings{' (or exactly an empty one)' if allow_empty else ''}; "
                         f"got {bad[:3]!r}")
    return prompts


def _encode_prompts(tokenizer, prompts: Sequence[str], chat: bool) -> list[list[int]]:
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat=True needs a tokenizer with a chat template; pass chat=False for plain prompts")
        return [list(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                   tokenize=True, return_dict=False)) for p in prompts]
    start = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    encoded = [start + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    empty = [p for p, ids in zip(prompts, encoded) if not ids]
    if empty:
        raise ValueError(f"prompt {empty[0]!r} encodes to no tokens and the tokenizer has no start token: "
                         "give it text, or use chat=True")
    return encoded


def _left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _read_partial(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a batch cut off mid-write: drop it and what follows
            break
    return rows


def synthesize_texts(model, tokenizer, prompts: Sequence[str], num_texts: int, *, folder: str | Path,
                     max_new_tokens: int = 80, temperature: float = 1.0, top_p: float = 0.95, batch_size: int = 16,
                     seed: int = 0, chat: bool = True, min_chars: int = 1, generator_name: str = ""):
    """``num_texts`` texts sampled from ``model`` (prompt ``i % len(prompts)`` for text ``i``), as a dataset.

    ``""`` is an empty prompt: the start token alone (``chat=False``) or an empty user turn (``chat=True``).

    Batch ``b`` is sampled with ``torch.manual_seed(seed + b)``; texts shorter than ``min_chars`` characters
    (after stripping) are kept with their prompt but flagged (``kept`` False) and left out of the dataset.
    A later call with a larger ``num_texts`` and otherwise the same settings keeps the complete batches already
    sampled and samples the rest (the texts a fresh call would give).
    Returns a ``datasets.Dataset`` with columns ``prompt``, ``text``, ``seed`` (reloadable with
    :func:`load_synthetic`).
    """
    from datasets import Dataset
    from tqdm.auto import tqdm

    prompts = check_prompts(prompts, allow_empty=True)
    if num_texts < 1:
        raise ValueError(f"num_texts must be >= 1, got {num_texts}")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    folder = Path(folder)
    settings = {"prompts": prompts, "num_texts": num_texts, "max_new_tokens": max_new_tokens,
                "temperature": temperature, "top_p": top_p, "batch_size": batch_size, "seed": seed, "chat": chat,
                "min_chars": min_chars, "generator": generator_name}
    saved = folder / SETTINGS_FILE
    if saved.is_file():
        previous = json.loads(saved.read_text())
        changed = sorted(k for k in set(previous) | set(settings)
                         if k != "num_texts" and previous.get(k) != settings.get(k))
        if changed or previous.get("num_texts", 0) > num_texts:
            raise ValueError(f"{folder} holds texts synthesised with other settings "
                             f"({', '.join(changed or ['num_texts: fewer asked'])}); delete that folder or choose "
                             "another one")
        if previous["num_texts"] == num_texts and (folder / DATASET_DIR).is_dir():
            logger.info("reusing the synthetic texts in %s", folder / DATASET_DIR)
            return load_synthetic(folder)
        if previous["num_texts"] < num_texts:  # more texts: the complete batches so far are kept, the rest sampled
            logger.info("extending the %d synthetic texts in %s to %d", previous["num_texts"], folder, num_texts)
            shutil.rmtree(folder / DATASET_DIR, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(settings, indent=1) + "\n")
    partial = folder / PARTIAL_FILE
    done = _read_partial(partial)
    n_batches = -(-num_texts // batch_size)
    done_batches = len(done) // batch_size if len(done) < num_texts else n_batches
    done = done[:done_batches * batch_size]
    partial.write_text("".join(json.dumps(r) + "\n" for r in done))  # drop a half-written batch
    if done_batches:
        logger.info("resuming: %d of %d batches already synthesised", done_batches, n_batches)

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    with open(partial, "a") as sink:
        for b in tqdm(range(done_batches, n_batches), desc="synthesising texts", unit="batch",
                      initial=done_batches, total=n_batches):
            indices = range(b * batch_size, min((b + 1) * batch_size, num_texts))
            batch_prompts = [prompts[i % len(prompts)] for i in indices]
            ids, mask = _left_pad(_encode_prompts(tokenizer, batch_prompts, chat), pad)
            torch.manual_seed(seed + b)
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=temperature > 0,
                                     temperature=temperature if temperature > 0 else None,
                                     top_p=top_p if temperature > 0 else None, max_new_tokens=max_new_tokens,
                                     pad_token_id=pad)
            texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
            for prompt, text in zip(batch_prompts, texts):
                text = text.strip()
                sink.write(json.dumps({"prompt": prompt, "text": text, "seed": seed + b,
                                       "kept": len(text) >= min_chars}) + "\n")
            sink.flush()
    model.train(was_training)
    rows = [r for r in _read_partial(partial) if r["kept"]]
    if not rows:
        raise ValueError(f"every synthesised text was shorter than min_chars={min_chars}; "
                         "raise max_new_tokens or lower min_chars")
    dataset = Dataset.from_dict({k: [r[k] for r in rows] for k in ("prompt", "text", "seed")})
    dataset.save_to_disk(str(folder / DATASET_DIR))
    logger.info("synthesised %d texts (%d dropped as too short) into %s", len(rows),
                num_texts - len(rows), folder / DATASET_DIR)
    return dataset


def load_synthetic(folder: str | Path):
    """The dataset :func:`synthesize_texts` saved in ``folder``."""
    from datasets import load_from_disk

    path = Path(folder) / DATASET_DIR
    if not path.is_dir():
        raise FileNotFoundError(f"no synthetic dataset in {folder} (expected {path}); run synthesize_texts first")
    return load_from_disk(str(path))


def prompt_rows(prompts: Sequence[str], tokenizer, *, chat: bool = True, repeats: int = 1):
    """Prompt-only rows for sequence-level KD (``seq_kd=True``): ``input_ids`` = the prompt, every label
    ``-100``, ``prompt_length`` = its length; the teacher writes each completion during training.

    ``""`` is an empty prompt (the start token alone with ``chat=False``). Each prompt appears ``repeats``
    times (different samples: generation is seeded by step and row). Train with
    ``remove_unused_columns=False``: the collator (:class:`hf_distill.lm.CompletionCollator`) reads
    ``prompt_length`` (the model never sees it)."""
    from datasets import Dataset

    prompts = check_prompts(prompts, allow_empty=True)
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    encoded = _encode_prompts(tokenizer, prompts, chat)
    rows = [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * len(ids),
             "prompt_length": len(ids)} for ids in encoded] * repeats
    return Dataset.from_list(rows)


#: :func:`prompt_set` names
PROMPT_SETS = ("generic", "empty")


def prompt_set(spec: str) -> list[str]:
    """The prompts ``spec`` names: ``generic`` (:data:`GENERIC_PROMPTS`), ``empty`` (one empty prompt: the start
    token alone, or an empty user turn with a chat template) or a text file with one prompt a line."""
    if spec == "generic":
        return list(GENERIC_PROMPTS)
    if spec == "empty":
        return [""]
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"prompts {spec!r}: give one of {', '.join(PROMPT_SETS)} or a text file with one prompt a "
                         "line (no such file)")
    return check_prompts([line.strip() for line in path.read_text().splitlines() if line.strip()])


def synthetic_blocks(texts, tokenizer, block_size: int, n_blocks: int):
    """The first ``n_blocks`` blocks of ``block_size`` tokens of the synthesised ``texts`` (a dataset with a
    ``text`` column), packed as documents are (:func:`hf_distill.lm.data.pack_text_blocks`: EOS after each).
    Fewer blocks than ``n_blocks`` is an error that says how many texts would be needed."""
    from hf_distill.lm.data import pack_text_blocks

    written = list(texts["text"])
    tokens = sum(len(ids) + 1 for ids in tokenizer(written, add_special_tokens=False)["input_ids"])  # + EOS each
    if tokens < n_blocks * block_size:
        need = -(-n_blocks * block_size * len(written) // max(tokens, 1))
        raise ValueError(f"the {len(written)} synthesised texts fill {tokens // block_size} blocks of {block_size} "
                         f"tokens, fewer than the {n_blocks} the comparison needs: synthesise more texts (about "
                         f"{need}) or longer ones")
    return pack_text_blocks(texts.select_columns(["text"]), tokenizer, block_size).select(range(n_blocks))

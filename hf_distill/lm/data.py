"""Causal-LM training data: packed text blocks, prompt-completion rows and chat ``messages``.

Three row formats, detected from the columns (:func:`detect_lm_format`):

* ``text``: plain documents, packed into blocks of ``block_size`` tokens (:func:`pack_text_blocks`;
  EOS between documents, no padding, ``labels = input_ids``: every token counts).
* ``prompt`` + ``completion``: plain strings, or lists of chat messages (conversational
  prompt-completion, rendered with the tokenizer's chat template). Only completion tokens count.
* ``messages``: a chat (a list of ``{"role", "content"}`` dicts), rendered with the chat template.
  Every assistant turn counts (its content and the template's end-of-turn text), nothing else.

:func:`tokenize_completion` turns one prompt-completion or messages row into ``input_ids``,
``attention_mask``, ``labels`` (``-100`` on every token that does not count) and ``prompt_length``:
the number of tokens before the last completion / assistant turn, i.e. the prompt a model would be
asked to continue (``input_ids[:prompt_length]``, used for generation by on-policy training).

Assistant spans are found by rendering the chat turn by turn: the text the template produces for
``messages[:i]`` with the generation prompt must be a prefix of its rendering of ``messages[:i+1]``;
the difference is assistant turn ``i``. The full rendering is tokenised once (with character offsets)
and a token counts when it starts inside an assistant span. Templates that break the prefix rule
(some drop earlier reasoning) are used through ``return_assistant_tokens_mask`` when they mark
assistant text with ``{% generation %}``; otherwise the row is refused with a message saying so.

Rows longer than ``max_length`` are cut from the right (the end of the completion is lost); a row
whose prompt alone fills ``max_length`` has nothing left to learn from and is refused (or dropped
with ``drop_long_prompts=True`` in :func:`prepare_lm_dataset`).

Public API::

    pack_text_blocks(texts_or_dataset, tokenizer, block_size, *, add_eos=True, text_column="text") -> Dataset
    tokenize_completion(example, tokenizer, *, max_length, prompt_field="prompt",
                        completion_field="completion", messages_field="messages") -> dict
    prepare_lm_dataset(dataset, tokenizer, *, max_length, block_size=None, text_column="text",
                       drop_long_prompts=False, num_proc=None) -> Dataset
    detect_lm_format(column_names, *, text_column="text") -> str
    IGNORE_INDEX = -100
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import datasets
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "detect_lm_format",
    "pack_text_blocks",
    "prepare_lm_dataset",
    "tokenize_completion",
]

IGNORE_INDEX = -100
#: format name -> the columns it needs
FORMATS = {"messages": ("messages",), "prompt_completion": ("prompt", "completion"), "text": ("text",)}


_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class PromptTooLongError(ValueError):
    """The prompt of a row alone fills ``max_length``: no completion token would be left."""


# --------------------------------------------------------------------------- plain text
def pack_text_blocks(
    texts_or_dataset: datasets.Dataset | Iterable[str],
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    *,
    add_eos: bool = True,
    text_column: str = "text",
    num_proc: int | None = None,
) -> datasets.Dataset:
    """Documents packed into rows of exactly ``block_size`` tokens for causal-LM training.

    ``texts_or_dataset`` is a ``datasets.Dataset`` with a ``text_column`` or any iterable of strings.
    The documents' tokens (EOS after each with ``add_eos``) form one stream cut into blocks; only the
    incomplete last block is dropped. Rows hold ``input_ids``, ``attention_mask`` (all ones) and
    ``labels`` (equal to ``input_ids``; the model shifts them). No padding anywhere.
    """
    import datasets

    from hf_distill.data.text import tokenize_and_pack

    if isinstance(texts_or_dataset, str):
        raise ValueError(  # noqa: TRY004 - bad input, reported as such by the CLI
            "pack_text_blocks takes a list of texts or a Dataset, not one string; wrap it in a list")
    if not isinstance(texts_or_dataset, (datasets.Dataset, datasets.DatasetDict)):
        texts = list(texts_or_dataset)
        bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
        if bad:
            raise ValueError(f"pack_text_blocks needs strings; got {len(bad)} items of type {sorted(set(bad))}")
        texts_or_dataset = datasets.Dataset.from_dict({text_column: texts})
    if tokenizer.eos_token_id is None and add_eos:
        raise ValueError("the tokenizer has no eos_token to separate documents; set tokenizer.eos_token or "
                         "pass add_eos=False")
    causal = _CausalView(tokenizer)  # no [CLS]/[SEP] layout for causal models
    packed = tokenize_and_pack(texts_or_dataset, causal, block_size=block_size, text_column=text_column,
                               num_proc=num_proc, add_special_tokens=add_eos)
    return packed.map(_copy_labels, batched=True, num_proc=num_proc, desc="Adding labels")


def _copy_labels(batch: dict) -> dict:
    return {"labels": batch["input_ids"]}


class _CausalView:
    """A tokenizer as the packer sees it for a causal LM: no [CLS]/[SEP] block layout, EOS separators."""

    cls_token_id = None
    sep_token_id = None

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)


# --------------------------------------------------------------------------- one completion row
def _is_messages(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(m, dict) and "role" in m for m in value)


def _check_messages(messages: Any, what: str) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"{what} must be a non-empty list of {{'role': ..., 'content': ...}} messages, "
                         f"got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{what}[{i}] must be a dict with 'role' and 'content', got {m!r:.80}")
    return [dict(m) for m in messages]


def _render(tokenizer, messages: list[dict], *, generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat rows need a tokenizer with a chat template (tokenizer.chat_template is unset); "
                         "set one, or give plain-text prompt/completion columns")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _chat_spans(tokenizer, messages: list[dict], first_counted: int) -> tuple[str, list[tuple[int, int]]] | None:
    """(full rendering, character spans that count) for ``messages``, or None if the template breaks
    the prefix rule. Counted: every assistant turn at index >= ``first_counted`` (a prompt-completion
    row counts its whole completion, whatever the roles)."""
    full = _render(tokenizer, messages, generation_prompt=False)
    spans = []
    for i in range(first_counted, len(messages)):
        if messages[i]["role"] != "assistant" and first_counted == 0:
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=messages[i]["role"] == "assistant") if i else ""
        after = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not after.startswith(before) or not full.startswith(after):
            return None
        if spans and spans[-1][1] == len(before):  # a completion of several messages: one span
            spans[-1] = (spans[-1][0], len(after))
        else:
            spans.append((len(before), len(after)))
    return full, spans


def _tokens_in_spans(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    counted = []
    for start, _end in enc["offset_mapping"]:
        counted.append(any(a <= start < b for a, b in spans))
    return list(enc["input_ids"]), counted


def _generation_mask(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    return list(out["input_ids"]), [bool(x) for x in out["assistant_masks"]]


def _chat_tokens(tokenizer, messages: list[dict], first_counted: int) -> tuple[list[int], list[bool]]:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("chat rows need a fast tokenizer (character offsets locate the assistant turns); "
                         "load it with AutoTokenizer.from_pretrained(..., use_fast=True)")
    rendered = _chat_spans(tokenizer, messages, first_counted)
    if rendered is not None:
        full, spans = rendered
        if not spans:
            raise ValueError("the chat has no assistant turn, so no token would count; every messages row needs "
                             "at least one message with role 'assistant'")
        return _tokens_in_spans(tokenizer, full, spans)
    if _GENERATION_TAG.search(tokenizer.chat_template or "") and first_counted == 0:
        return _generation_mask(tokenizer, messages)
    raise ValueError("the chat template does not render a conversation as a prefix of its continuation (it "
                     "rewrites earlier turns), so assistant turns cannot be located; use a template that marks "
                     "assistant text with {% generation %} or plain-text prompt/completion columns")


def _plain_tokens(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[bool]]:
    prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    # a tokenizer that appends EOS itself (add_eos_token) would put it inside the prompt: drop it there
    if len(prompt_ids) > 1 and tokenizer.eos_token_id is not None and prompt_ids[-1] == tokenizer.eos_token_id \
            and not prompt.endswith(tokenizer.eos_token or "\0"):
        prompt_ids = prompt_ids[:-1]
    completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None and (not completion_ids or completion_ids[-1] != tokenizer.eos_token_id):
        completion_ids.append(tokenizer.eos_token_id)
    return prompt_ids + completion_ids, [False] * len(prompt_ids) + [True] * len(completion_ids)


def _row_tokens(example: dict, tokenizer, prompt_field: str, completion_field: str,
                messages_field: str) -> tuple[list[int], list[bool], int]:
    """(ids, counted flags, prompt length) for one row."""
    if messages_field in example and example[messages_field] is not None:
        messages = _check_messages(example[messages_field], messages_field)
        ids, counted = _chat_tokens(tokenizer, messages, 0)
    elif prompt_field in example and completion_field in example:
        prompt, completion = example[prompt_field], example[completion_field]
        if isinstance(prompt, str) and isinstance(completion, str):
            ids, counted = _plain_tokens(tokenizer, prompt, completion)
        elif _is_messages(prompt) and _is_messages(completion):
            prompt = _check_messages(prompt, prompt_field)
            completion = _check_messages(completion, completion_field)
            ids, counted = _chat_tokens(tokenizer, prompt + completion, len(prompt))
        else:
            raise ValueError(
                f"{prompt_field!r} and {completion_field!r} must both be strings or both be lists of chat "
                f"messages; got {type(prompt).__name__} and {type(completion).__name__}"
            )
    else:
        raise ValueError(f"the row has columns {sorted(example)}; a completion row needs {messages_field!r} or "
                         f"both {prompt_field!r} and {completion_field!r}")
    if not any(counted):
        raise ValueError("no token of the row counts (empty completion or assistant turn)")
    last_start = max(i for i, c in enumerate(counted) if c and (i == 0 or not counted[i - 1]))
    return ids, counted, last_start


def tokenize_completion(
    example: dict,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    messages_field: str = "messages",
) -> dict:
    """One prompt-completion or chat row as ``input_ids``, ``attention_mask``, ``labels``, ``prompt_length``.

    ``labels`` is ``input_ids`` with ``-100`` on every token that is not completion / assistant text.
    Plain-text rows: the prompt tokenised with the tokenizer's special tokens (BOS where it adds one),
    then the completion and EOS. Chat rows go through ``tokenizer.apply_chat_template``.
    ``prompt_length`` counts the tokens before the last counted span (the generation prompt).
    Rows longer than ``max_length`` are cut from the right; a prompt that alone fills ``max_length``
    raises ``ValueError``.
    """
    if max_length is None or int(max_length) < 2:
        raise ValueError(f"max_length must be an integer of at least 2, got {max_length!r}")
    ids, counted, prompt_length = _row_tokens(example, tokenizer, prompt_field, completion_field, messages_field)
    if prompt_length >= max_length:
        raise PromptTooLongError(
            f"the prompt has {prompt_length} tokens, max_length is {max_length}: no completion token would be "
            "left; raise max_length, shorten or filter the prompts (prepare_lm_dataset(drop_long_prompts=True))"
        )
    ids, counted = ids[:max_length], counted[:max_length]
    labels = [t if c else IGNORE_INDEX for t, c in zip(ids, counted)]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels, "prompt_length": prompt_length}


# --------------------------------------------------------------------------- whole datasets
def detect_lm_format(column_names: Sequence[str], *, text_column: str = "text") -> str:
    """``"messages"``, ``"prompt_completion"`` or ``"text"`` from a dataset's columns."""
    columns = list(column_names)
    if "messages" in columns:
        return "messages"
    if "prompt" in columns and "completion" in columns:
        return "prompt_completion"
    if text_column in columns:
        return "text"
    accepted = f"'messages' (chat), 'prompt' + 'completion', or '{text_column}' (plain text)"
    hint = ""
    if "prompt" in columns or "completion" in columns:
        hint = "; 'prompt' and 'completion' are needed together"
    raise ValueError(f"cannot tell the data format from the columns {columns}; accepted: {accepted}{hint}. "
                     "Rename the columns (dataset.rename_column) to one of these layouts")


def prepare_lm_dataset(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    block_size: int | None = None,
    text_column: str = "text",
    drop_long_prompts: bool = False,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """Tokenise a causal-LM dataset of any of the three formats (see the module docstring).

    Text is packed into blocks of ``block_size`` (default ``max_length``) tokens; prompt-completion
    and messages rows become one row each, at most ``max_length`` tokens, with ``prompt_length``
    kept. The source columns are removed. A ``DatasetDict`` is prepared split by split.
    """
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        return datasets.DatasetDict({
            name: prepare_lm_dataset(split, tokenizer, max_length=max_length, block_size=block_size,
                                     text_column=text_column, drop_long_prompts=drop_long_prompts,
                                     num_proc=num_proc)
            for name, split in dataset.items()
        })
    kind = detect_lm_format(dataset.column_names, text_column=text_column)
    if kind == "text":
        return pack_text_blocks(dataset, tokenizer, block_size or max_length, text_column=text_column,
                                num_proc=num_proc)
    if block_size is not None:
        logger.info("block_size applies to plain text only; %s rows are kept one per row", kind)

    def tokenize(example: dict) -> dict:
        try:
            row = tokenize_completion(example, tokenizer, max_length=max_length)
        except PromptTooLongError:
            if not drop_long_prompts:
                raise
            return {"input_ids": [], "attention_mask": [], "labels": [], "prompt_length": -1}
        return row

    tokenized = dataset.map(tokenize, remove_columns=dataset.column_names, num_proc=num_proc,
                            desc=f"Tokenising {kind} rows")
    if drop_long_prompts:
        kept = tokenized.filter(lambda n: n >= 0, input_columns="prompt_length", num_proc=num_proc)
        if len(kept) < len(tokenized):
            logger.warning("dropped %d of %d rows whose prompt fills max_length=%d", len(tokenized) - len(kept),
                           len(tokenized), max_length)
        if len(kept) == 0:
            raise ValueError(f"every prompt fills max_length={max_length}; raise max_length")
        tokenized = kept
    return tokenized

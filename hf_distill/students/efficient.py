"""Efficient-operation students: a BiLSTM and a CNN text classifier (Tang et al. 2019, "Distilling
task-specific knowledge from BERT into simple neural networks"; the CNN is Kim 2014's).

Both are ``PreTrainedModel`` subclasses with their own ``PretrainedConfig``, registered with
``AutoConfig`` and ``AutoModelForSequenceClassification`` when this module is imported, so the
Trainer, checkpoints, ``save_pretrained`` / ``from_pretrained`` and the Hub work unchanged. They
read the teacher's token ids (same tokenizer, same vocabulary), ``attention_mask`` decides which
positions count, and their class names end in ``ForSequenceClassification``, so a
``DistillationTrainer`` treats them as sequence classifiers: they learn from the teacher's outputs
only (terms ``kl``, ``logit_mse``, ``task``; cached teacher logits make that cheap). They have no
transformer layers: a hidden-state or attention term is refused with a message.

Padding: the valid tokens of each row (``attention_mask == 1``) are moved to the front in their
order, so right, left or scattered padding give the same logits as the unpadded text; the BiLSTM
packs the sequences (padding never enters the recurrence), the CNN zeroes padded embeddings and
pools only over windows that start inside the text; pooling (max / mean over valid positions, or
the BiLSTM's last states) never sees a padded position.

Embedding initialisation (:func:`init_embeddings_from_teacher`, used by
:func:`build_efficient_student`): the student's embedding matrix comes from the teacher's input
embeddings, row for row (same vocabulary): **copied** when the widths are equal, **projected** on
their top principal components (PCA of the teacher's embedding matrix) when the student's width is
smaller; in both cases rescaled to a root-mean-square of 1 per entry (the teacher's raw embeddings
are ~0.05, made for a LayerNorm that the student does not have). A wider student embedding is
refused (``embedding_init="random"`` trains it from scratch instead).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import SequenceClassifierOutput

__all__ = [
    "BiLSTMClassifierConfig",
    "BiLSTMForSequenceClassification",
    "CNNClassifierConfig",
    "CNNForSequenceClassification",
    "EFFICIENT_ARCHITECTURES",
    "build_efficient_student",
    "init_embeddings_from_teacher",
]

POOLINGS = ("max", "mean", "last")


def _check_common(config) -> None:
    if not isinstance(config.vocab_size, int) or config.vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer (the tokenizer's size), got {config.vocab_size!r}")
    if not isinstance(config.embedding_dim, int) or config.embedding_dim < 1:
        raise ValueError(f"embedding_dim must be a positive integer, got {config.embedding_dim!r}")
    if not 0.0 <= float(config.dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {config.dropout!r}")
    if config.classifier_hidden_size < 0:
        raise ValueError(f"classifier_hidden_size must be >= 0 (0: no hidden layer), got {config.classifier_hidden_size}")


class BiLSTMClassifierConfig(PretrainedConfig):
    """A (Bi)LSTM over token embeddings, pooled, then a small classifier (Tang et al. 2019).

    Args:
        vocab_size: rows of the embedding matrix (the teacher tokenizer's vocabulary).
        embedding_dim: width of the token embeddings.
        lstm_hidden_size: hidden units per direction.
        num_hidden_layers: stacked LSTM layers.
        bidirectional: a backward LSTM too (the output width doubles).
        pooling: ``max`` or ``mean`` over valid positions, or ``last`` (final forward and backward states).
        classifier_hidden_size: width of the ReLU layer before the output layer (0: none).
        dropout: on the embeddings and before each classifier layer.
        embedding_init: how the embeddings were initialised (recorded by :func:`build_efficient_student`).
    """

    model_type = "hf_distill_bilstm"

    def __init__(self, vocab_size: int = 30522, embedding_dim: int = 128, lstm_hidden_size: int = 128,
                 num_hidden_layers: int = 1, bidirectional: bool = True, pooling: str = "max",
                 classifier_hidden_size: int = 128, dropout: float = 0.1, embedding_init: str = "random",
                 pad_token_id: int = 0, **kwargs):
        self.vocab_size, self.embedding_dim, self.lstm_hidden_size = vocab_size, embedding_dim, lstm_hidden_size
        self.num_hidden_layers, self.bidirectional, self.pooling = num_hidden_layers, bidirectional, pooling
        self.classifier_hidden_size, self.dropout, self.embedding_init = classifier_hidden_size, dropout, embedding_init
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        _check_common(self)
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        if not isinstance(num_hidden_layers, int) or num_hidden_layers < 1:
            raise ValueError(f"num_hidden_layers (LSTM layers) must be >= 1, got {num_hidden_layers!r}")
        if lstm_hidden_size < 1:
            raise ValueError(f"lstm_hidden_size must be >= 1, got {lstm_hidden_size}")


class CNNClassifierConfig(PretrainedConfig):
    """Parallel 1-D convolutions over token embeddings, max-pooled over time, then a classifier (Kim 2014).

    Args:
        vocab_size, embedding_dim, classifier_hidden_size, dropout, embedding_init: as for the BiLSTM.
        kernel_sizes: window widths (tokens) of the convolutions, one bank of filters each.
        num_filters: filters per window width.
    """

    model_type = "hf_distill_cnn"

    def __init__(self, vocab_size: int = 30522, embedding_dim: int = 128, kernel_sizes=(3, 4, 5),
                 num_filters: int = 100, classifier_hidden_size: int = 0, dropout: float = 0.1,
                 embedding_init: str = "random", pad_token_id: int = 0, **kwargs):
        self.vocab_size, self.embedding_dim = vocab_size, embedding_dim
        self.kernel_sizes, self.num_filters = [int(k) for k in kernel_sizes], num_filters
        self.classifier_hidden_size, self.dropout, self.embedding_init = classifier_hidden_size, dropout, embedding_init
        self.num_hidden_layers = 1  # one convolution layer (reported next to transformer layer counts)
        kwargs.pop("num_hidden_layers", None)
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        _check_common(self)
        if not self.kernel_sizes or min(self.kernel_sizes) < 1:
            raise ValueError(f"kernel_sizes must be a non-empty list of positive widths, got {kernel_sizes!r}")
        if num_filters < 1:
            raise ValueError(f"num_filters must be >= 1, got {num_filters}")


# ---------------------------------------------------------------------------------------------- shared pieces
def valid_first(input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """(ids, mask, lengths) with each row's valid tokens moved to the front, in order; every row keeps >= 1."""
    if attention_mask is None:
        mask = torch.ones_like(input_ids, dtype=torch.bool)
    else:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids "
                             f"{tuple(input_ids.shape)}; they must match")
        mask = attention_mask.bool()
    if not bool(mask[:, 0].all()) or not bool((mask.cummin(dim=1).values == mask).all()):  # not right-padded
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
        input_ids, mask = input_ids.gather(1, order), mask.gather(1, order)
    mask = mask.clone()
    mask[:, 0] = True  # an empty row reads its first position rather than nothing
    return input_ids, mask, mask.sum(dim=1)


def masked_pool(states: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Max or mean of ``states`` (batch, time, width) over positions where ``mask`` is True."""
    if how == "max":
        return states.masked_fill(~mask[..., None], torch.finfo(states.dtype).min).max(dim=1).values
    weights = mask[..., None].to(states.dtype)
    return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


class ClassifierHead(nn.Module):
    """dropout -> [Linear -> ReLU -> dropout] -> Linear(num_labels)."""

    def __init__(self, in_features: int, hidden: int, num_labels: int, dropout: float):
        super().__init__()
        layers: list[nn.Module] = [nn.Dropout(dropout)]
        if hidden:
            layers += [nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout)]
            in_features = hidden
        layers.append(nn.Linear(in_features, num_labels))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class EfficientClassifierPreTrainedModel(PreTrainedModel):
    """Shared loading, initialisation and loss of the efficient students."""

    base_model_prefix = "efficient"
    main_input_name = "input_ids"
    # Why hidden-state / attention distillation terms cannot read this student (checked by the objective).
    feature_distillation_refusal = (
        "this student has no transformer layers, so it has no hidden states, attention maps or Q/K/V to match the "
        "teacher's; distil it from the teacher's outputs only: terms kl, logit_mse and task (for the default "
        "terms: --cos_weight 0 --hidden_mse_weight 0)")
    # Why LoRA adapters do not apply (checked by hf_distill.students.peft_students.apply_peft).
    peft_refusal = (
        "LoRA adapts the frozen weights of a pretrained model, and this student has none to keep: its LSTM / "
        "convolutions start from scratch (only the embeddings come from the teacher) and it is small enough to "
        "train in full; train it without --use_peft")

    def _init_weights(self, module):
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=1.0)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, (nn.Linear, nn.Conv1d)):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LSTM):
            for name, param in module.named_parameters():
                if "weight" in name:
                    nn.init.orthogonal_(param) if "weight_hh" in name else nn.init.xavier_uniform_(param)
                else:
                    nn.init.zeros_(param)
                    hidden = param.shape[0] // 4
                    with torch.no_grad():
                        param[hidden:2 * hidden].fill_(1.0 if "bias_ih" in name else 0.0)  # forget gate

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings = value

    def _refuse_features(self, output_hidden_states, output_attentions) -> None:
        if output_hidden_states or output_attentions:
            what = "output_hidden_states" if output_hidden_states else "output_attentions"
            raise ValueError(f"{type(self).__name__} was asked for {what}: {self.feature_distillation_refusal}")

    def _output(self, logits: torch.Tensor, labels: torch.Tensor | None, return_dict):
        loss = None
        if labels is not None:
            if self.config.num_labels == 1:
                loss = nn.functional.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = nn.functional.cross_entropy(logits.float().view(-1, self.config.num_labels), labels.view(-1))
        if return_dict is False:
            return (logits,) if loss is None else (loss, logits)
        return SequenceClassifierOutput(loss=loss, logits=logits)


class BiLSTMForSequenceClassification(EfficientClassifierPreTrainedModel):
    """Embeddings -> (Bi)LSTM over the valid tokens -> pooling -> classifier."""

    config_class = BiLSTMClassifierConfig

    def __init__(self, config: BiLSTMClassifierConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.embeddings = nn.Embedding(config.vocab_size, config.embedding_dim, padding_idx=config.pad_token_id)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.lstm = nn.LSTM(config.embedding_dim, config.lstm_hidden_size, num_layers=config.num_hidden_layers,
                            batch_first=True, bidirectional=config.bidirectional,
                            dropout=config.dropout if config.num_hidden_layers > 1 else 0.0)
        width = config.lstm_hidden_size * (2 if config.bidirectional else 1)
        self.classifier = ClassifierHead(width, config.classifier_hidden_size, config.num_labels, config.dropout)
        self.post_init()

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                output_hidden_states: bool | None = None, output_attentions: bool | None = None,
                return_dict: bool | None = None):
        """``token_type_ids`` is accepted (BERT tokenizers return it) and ignored."""
        self._refuse_features(output_hidden_states, output_attentions)
        if input_ids is None:
            raise ValueError(f"{type(self).__name__} needs input_ids")
        input_ids, mask, lengths = valid_first(input_ids, attention_mask)
        embedded = self.embedding_dropout(self.embeddings(input_ids))
        packed = pack_padded_sequence(embedded, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, (h_n, _) = self.lstm(packed)
        if self.config.pooling == "last":
            directions = 2 if self.config.bidirectional else 1
            features = torch.cat([h_n[-d] for d in range(directions, 0, -1)], dim=-1)
        else:
            states, _ = pad_packed_sequence(out, batch_first=True, total_length=input_ids.shape[1])
            features = masked_pool(states, mask, self.config.pooling)
        return self._output(self.classifier(features), labels, return_dict)


class CNNForSequenceClassification(EfficientClassifierPreTrainedModel):
    """Embeddings -> parallel Conv1d banks + ReLU -> max over valid windows -> classifier."""

    config_class = CNNClassifierConfig

    def __init__(self, config: CNNClassifierConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.embeddings = nn.Embedding(config.vocab_size, config.embedding_dim, padding_idx=config.pad_token_id)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.convs = nn.ModuleList(nn.Conv1d(config.embedding_dim, config.num_filters, k) for k in config.kernel_sizes)
        self.classifier = ClassifierHead(config.num_filters * len(config.kernel_sizes), config.classifier_hidden_size,
                                         config.num_labels, config.dropout)
        self.post_init()

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                output_hidden_states: bool | None = None, output_attentions: bool | None = None,
                return_dict: bool | None = None):
        """``token_type_ids`` is accepted (BERT tokenizers return it) and ignored."""
        self._refuse_features(output_hidden_states, output_attentions)
        if input_ids is None:
            raise ValueError(f"{type(self).__name__} needs input_ids")
        input_ids, mask, lengths = valid_first(input_ids, attention_mask)
        embedded = self.embedding_dropout(self.embeddings(input_ids)) * mask[..., None].to(self.embeddings.weight.dtype)
        width = max(self.config.kernel_sizes)
        x = embedded.transpose(1, 2)  # (batch, embedding, time)
        if x.shape[-1] < width:
            x = nn.functional.pad(x, (0, width - x.shape[-1]))
        pooled = []
        for conv in self.convs:
            maps = torch.relu(conv(x)).transpose(1, 2)  # (batch, windows, filters)
            starts = torch.arange(maps.shape[1], device=maps.device)
            # a window counts when it starts inside the text and fits in it (or is the first, for short texts)
            windows = starts[None, :] <= (lengths[:, None] - conv.kernel_size[0]).clamp(min=0)
            pooled.append(masked_pool(maps, windows, "max"))
        return self._output(self.classifier(torch.cat(pooled, dim=-1)), labels, return_dict)


EFFICIENT_ARCHITECTURES = {
    "bilstm": (BiLSTMClassifierConfig, BiLSTMForSequenceClassification),
    "cnn": (CNNClassifierConfig, CNNForSequenceClassification),
}

for _config_class, _model_class in EFFICIENT_ARCHITECTURES.values():
    try:
        AutoConfig.register(_config_class.model_type, _config_class)
    except ValueError:  # already registered (module reloaded)
        pass
    try:
        AutoModelForSequenceClassification.register(_config_class, _model_class)
    except ValueError:
        pass


# ---------------------------------------------------------------------------------------------- from a teacher
@torch.no_grad()
def init_embeddings_from_teacher(student: EfficientClassifierPreTrainedModel, teacher) -> str:
    """Fill the student's embeddings from the teacher's input embeddings; return what was done.

    Same width: copied. Narrower student: the teacher's rows projected on the matrix's top
    ``embedding_dim`` principal components. Either way rescaled to an RMS of 1 per entry. A wider
    student, or a different vocabulary size, is refused.
    """
    source = teacher.get_input_embeddings().weight.detach().float()
    target = student.get_input_embeddings().weight
    if source.shape[0] != target.shape[0]:
        raise ValueError(f"the teacher embeds {source.shape[0]} tokens but the student {target.shape[0]}; build the "
                         "student with the teacher's vocabulary (vocab_size = the teacher's)")
    d_t, d_s = source.shape[1], target.shape[1]
    if d_s > d_t:
        raise ValueError(f"the student's embedding_dim {d_s} is wider than the teacher's embeddings ({d_t}); choose "
                         f"embedding_dim <= {d_t} or embedding_init='random'")
    if d_s == d_t:
        values, how = source, "copied from the teacher's input embeddings"
    else:
        centred = source - source.mean(dim=0, keepdim=True)
        eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred)  # ascending
        top = eigenvectors[:, -d_s:].flip(-1)
        values = centred @ top
        kept = float(eigenvalues[-d_s:].sum() / eigenvalues.clamp(min=0).sum())
        how = f"teacher's input embeddings projected on their top {d_s} principal components ({100 * kept:.0f}% of variance)"
    values = values / values.pow(2).mean().sqrt().clamp(min=1e-12)
    target.copy_(values.to(target.dtype))
    student.config.embedding_init = how + ", rescaled to RMS 1"
    return student.config.embedding_init


def build_efficient_student(teacher, architecture: str = "bilstm", *, tokenizer=None, embedding_init: str = "teacher",
                            seed: int | None = None, **config_kwargs) -> EfficientClassifierPreTrainedModel:
    """A BiLSTM or CNN classifier for ``teacher``'s task: its vocabulary size, labels (``id2label``) and padding
    id, embeddings from the teacher (``embedding_init="teacher"``, see :func:`init_embeddings_from_teacher`) or
    random (``"random"``). ``config_kwargs`` go to the config (``embedding_dim``, ``lstm_hidden_size``, ...)."""
    if architecture not in EFFICIENT_ARCHITECTURES:
        raise ValueError(f"unknown efficient student {architecture!r}; choose {', '.join(EFFICIENT_ARCHITECTURES)}")
    if embedding_init not in ("teacher", "random"):
        raise ValueError(f"embedding_init must be 'teacher' or 'random', got {embedding_init!r}")
    t_config = teacher.config
    if not type(teacher).__name__.endswith("ForSequenceClassification"):
        raise ValueError(f"an efficient student learns a sequence-classification teacher's outputs; got a "
                         f"{type(teacher).__name__}: load the teacher with AutoModelForSequenceClassification")
    vocab_size = teacher.get_input_embeddings().weight.shape[0]
    if tokenizer is not None and len(tokenizer) > vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the teacher embeds {vocab_size}; use the "
                         "teacher's own tokenizer")
    pad = getattr(t_config, "pad_token_id", None)
    if pad is None and tokenizer is not None:
        pad = tokenizer.pad_token_id
    config_class, model_class = EFFICIENT_ARCHITECTURES[architecture]
    config = config_class(vocab_size=vocab_size, pad_token_id=pad if pad is not None else 0,
                          num_labels=t_config.num_labels, id2label=dict(t_config.id2label),
                          label2id=dict(t_config.label2id), **config_kwargs)
    if seed is not None:
        torch.manual_seed(seed)
    student = model_class(config)
    if embedding_init == "teacher":
        init_embeddings_from_teacher(student, teacher)
    return student

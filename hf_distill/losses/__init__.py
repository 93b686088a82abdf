"""Pure loss functions of tensors (fp32, masked, normalised by an explicit item count).

* response-based (output distributions): :func:`kl_div_loss`, :func:`reverse_kl_loss`,
  :func:`generalized_jsd_loss`, :func:`topk_kl_loss`, :func:`logit_mse_loss`;
* memory-bounded variants for large vocabularies: :func:`chunked_kl_loss`,
  :func:`chunked_generalized_jsd_loss`, :func:`fused_linear_kl_loss`, :func:`chunked_topk_kl_loss`,
  :func:`fused_linear_cross_entropy` (hard-label CE from hidden states and the projection);
* feature-based (hidden states, attention maps): :func:`hidden_mse_loss`, :func:`cosine_loss`,
  :func:`hidden_states_loss`, :func:`attention_mse_loss`, :func:`attention_kl_loss`, with
  :class:`LinearProjection` / :func:`make_projection` and the layer maps :func:`layer_map`,
  :func:`attention_layer_map`, :func:`validate_layer_map`;
* relation-based: :func:`attention_relation_loss` (MiniLMv2), :func:`rkd_distance_loss`,
  :func:`rkd_angle_loss`, :func:`similarity_preserving_loss`;
* across tokenizers (aligned rows of two vocabularies): :func:`uld_loss`, :func:`shared_vocabulary_kl_loss`;
* task: :func:`cross_entropy_loss`.
"""

from .chunked import chunked_generalized_jsd_loss, chunked_kl_loss, fused_linear_kl_loss
from .chunked_topk import chunked_topk_kl_loss
from .cross_tokenizer import shared_vocabulary_kl_loss, uld_loss
from .fused_ce import fused_linear_cross_entropy
from .feature import (
    LinearProjection,
    attention_kl_loss,
    attention_layer_map,
    attention_mse_loss,
    cosine_loss,
    hidden_mse_loss,
    hidden_states_loss,
    layer_map,
    make_projection,
    make_projections,
    validate_layer_map,
)
from .relation import attention_relation_loss, rkd_angle_loss, rkd_distance_loss, similarity_preserving_loss
from .response import generalized_jsd_loss, kl_div_loss, logit_mse_loss, reverse_kl_loss, topk_kl_loss
from .task import IGNORE_INDEX, cross_entropy_loss

__all__ = [
    "IGNORE_INDEX",
    "LinearProjection",
    "attention_kl_loss",
    "attention_layer_map",
    "attention_mse_loss",
    "attention_relation_loss",
    "chunked_generalized_jsd_loss",
    "chunked_kl_loss",
    "chunked_topk_kl_loss",
    "cosine_loss",
    "cross_entropy_loss",
    "fused_linear_cross_entropy",
    "fused_linear_kl_loss",
    "generalized_jsd_loss",
    "hidden_mse_loss",
    "hidden_states_loss",
    "kl_div_loss",
    "layer_map",
    "logit_mse_loss",
    "make_projection",
    "make_projections",
    "reverse_kl_loss",
    "rkd_angle_loss",
    "rkd_distance_loss",
    "shared_vocabulary_kl_loss",
    "similarity_preserving_loss",
    "topk_kl_loss",
    "uld_loss",
    "validate_layer_map",
]

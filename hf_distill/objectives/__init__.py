"""The distillation objective: a list of weighted loss terms built from configuration.

A term is a small ``nn.Module`` that reads the tensors gathered once per step (student and teacher
logits, hidden states, attentions, Q/K/V projections, masks and item counts) and calls a pure loss
function from :mod:`hf_distill.losses`. Terms may own parameters (learned projections); those are
trained with the student and never saved in it. The objective owns the masks and item counts its
terms are normalised by (:mod:`hf_distill.objectives.layout`).

Configuration (YAML, or JSON on the command line with ``--distillation``)::

    distillation:
      - {loss: kl, weight: 5.0, temperature: 2.0}
      - {loss: hidden_mse, layers: {1: 3, 2: 6}, projection: linear, weight: 1.0}
      - {loss: attention_relation, relation_heads: 12, weight: 1.0}

The task loss on hard labels is added with ``task_weight`` unless the list has a ``task`` term.
Add your own term by name::

    @register_term("my_term")
    class MyTerm(Term):
        def forward(self, step):
            return ((step.student.logits - step.teacher().logits) ** 2).mean()

Modules: ``base`` (Term, registry, step tensors), ``layout`` (masks and counts), ``response``,
``feature``, ``relation``, ``adversarial``, ``graph`` (the teacher's k-NN sample graph) and ``exits`` (the built-in terms; ``exit_kl`` trains early-exit heads on the
model's own final output), ``objective`` (the list as one callable).
"""

from .adversarial import AdversarialTerm, Discriminator
from .base import TERM_REGISTRY, ModelTensors, StepTensors, Term, register_term
from .cross_tokenizer import CROSS_TOKENIZER_TERMS, CrossTokenizerTerm
from .exits import ExitHead, ExitTerm, build_exit_head
from .feature import HiddenTerm
from .graph import KnnGraphTerm
from .layout import BatchLayout
from .objective import Objective, build_objective, default_terms, parse_distillation_spec
from .relation import SampleRelationTerm
from .response import ResponseTerm, chunk_rows, divergence

__all__ = [
    "CROSS_TOKENIZER_TERMS",
    "TERM_REGISTRY",
    "AdversarialTerm",
    "BatchLayout",
    "CrossTokenizerTerm",
    "Discriminator",
    "ExitHead",
    "ExitTerm",
    "HiddenTerm",
    "KnnGraphTerm",
    "ModelTensors",
    "Objective",
    "ResponseTerm",
    "SampleRelationTerm",
    "StepTensors",
    "Term",
    "build_exit_head",
    "build_objective",
    "chunk_rows",
    "default_terms",
    "divergence",
    "parse_distillation_spec",
    "register_term",
]

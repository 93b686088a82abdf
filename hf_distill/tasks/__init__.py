"""Task-specific building blocks for the recipes (data loading and checks, metrics, reports).

Names load on first use, like the other packages of hf_distill.

* :mod:`hf_distill.tasks.classification`: sequence classification (single texts or text pairs): metrics,
  intervals, latency, reports; :mod:`~hf_distill.tasks.classification_data`: loading and checking data;
* :mod:`hf_distill.tasks.classification_recipe`: the steps the classification recipes share;
* :mod:`hf_distill.tasks.transfer_set`: unlabeled texts a teacher labels (withheld labels, files, datasets).
"""

from __future__ import annotations

from hf_distill._lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "hf_distill.tasks.classification": ("ClassificationData", "DataError", "bootstrap_ci", "classification_metrics",
                                        "load_bbc_news", "load_classification_data", "macro_f1", "measure_latency",
                                        "paired_bootstrap_diff", "plot_results", "predict_logits", "results_markdown",
                                        "stratified_split", "tokenize_for_classification",
                                        "validate_classification_data", "write_results"),
}, submodules=("classification", "classification_data", "classification_recipe", "transfer_set"))

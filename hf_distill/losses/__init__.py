"""Pure loss functions of tensors (fp32, masked, normalised by an explicit item count)."""

from .feature import cosine_loss, hidden_mse_loss
from .response import kl_div_loss, logit_mse_loss
from .task import IGNORE_INDEX, cross_entropy_loss

__all__ = [
    "IGNORE_INDEX",
    "cosine_loss",
    "cross_entropy_loss",
    "hidden_mse_loss",
    "kl_div_loss",
    "logit_mse_loss",
]

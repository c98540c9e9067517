"""Stochastic top-K losses (Garcin et al., ICML 2022), their baselines and top-K metrics.

Pure PyTorch: importing this package imports neither ray, fastapi nor pydantic.
"""

from topk.registry import create_loss, get_loss_class, list_losses

__all__ = ["create_loss", "get_loss_class", "list_losses"]

"""PyTorch Lightning integration: an optimizer factory and a callback."""

from singd_lightning.lightning.factory import (
    OPTIMIZER_NAMES,
    build_optimizer,
    configure_singd,
)

__all__ = ["OPTIMIZER_NAMES", "build_optimizer", "configure_singd"]

"""PyTorch Lightning integration: a callback that attaches SINGD to any
``LightningModule``, an optimizer factory for ``configure_optimizers``, and a
diagnostics callback."""

from singd_lightning.lightning.callback import SINGDCallback, SINGDDiagnostics
from singd_lightning.lightning.factory import (
    OPTIMIZER_NAMES,
    ModelOptimizerCallable,
    build_optimizer,
    configure_singd,
)
from singd_lightning.lightning.schedulers import retarget_scheduler
from singd_lightning.lightning.strategy import SUPPORTED_STRATEGIES, check_strategy

__all__ = [
    "ModelOptimizerCallable",
    "OPTIMIZER_NAMES",
    "SUPPORTED_STRATEGIES",
    "SINGDCallback",
    "SINGDDiagnostics",
    "build_optimizer",
    "check_strategy",
    "configure_singd",
    "retarget_scheduler",
]

"""singd-lightning: structured inverse-free natural gradient descent for PyTorch
and PyTorch Lightning."""

from singd_lightning.lightning import SINGDCallback, SINGDDiagnostics, configure_singd
from singd_lightning.optim import IKFAC, INGD, KFAC, SINGD

__version__ = "0.1.0"

__all__ = [
    "SINGD",
    "INGD",
    "IKFAC",
    "KFAC",
    "SINGDCallback",
    "SINGDDiagnostics",
    "configure_singd",
    "__version__",
]

"""Optimizers: SINGD (with INGD and IKFAC) and the dense KFAC baseline."""

from singd_lightning.optim.base import KroneckerOptimizer
from singd_lightning.optim.factory import create_optimizer
from singd_lightning.optim.kfac import KFAC
from singd_lightning.optim.singd import IKFAC, INGD, PAPER_UPDATE, SINGD

__all__ = ["SINGD", "INGD", "IKFAC", "KFAC", "KroneckerOptimizer", "create_optimizer", "PAPER_UPDATE"]

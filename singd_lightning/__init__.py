"""singd-lightning: structured inverse-free natural gradient descent for PyTorch
and PyTorch Lightning."""

from singd_lightning.optim import IKFAC, INGD, KFAC, SINGD

__version__ = "0.1.0"

# The Lightning integration is imported on first use: plain-PyTorch users don't
# pay for importing Lightning.
_LIGHTNING_NAMES = ("SINGDCallback", "SINGDDiagnostics", "configure_singd")


def __getattr__(name: str):
    if name in _LIGHTNING_NAMES:
        from singd_lightning import lightning

        return getattr(lightning, name)
    raise AttributeError(f"module 'singd_lightning' has no attribute {name!r}")


__all__ = ["SINGD", "INGD", "IKFAC", "KFAC", *_LIGHTNING_NAMES, "__version__"]

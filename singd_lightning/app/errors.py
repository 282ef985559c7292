"""User errors of the app: which exceptions are the user's to fix (a bad config value,
a missing data set or checkpoint) and the one line that reports them.

``python train.py`` prints ``Error: <one line>`` for those and exits with status 1;
any other exception is a bug and keeps its traceback. ``HYDRA_FULL_ERROR=1`` shows
the traceback of every error.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from pathlib import Path
from types import TracebackType

from hydra.errors import CompactHydraException, InstantiationException
from omegaconf.errors import OmegaConfBaseException

#: Exit status of a run stopped by a user error.
USER_ERROR_EXIT = 1

#: Longest reported message; the rest (a state dict's key list, say) is cut.
MAX_MESSAGE_CHARS = 600

_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # singd_lightning/
_TORCH_OPTIM = f"{os.sep}torch{os.sep}optim{os.sep}"
#: Python's TypeError for a call whose arguments do not match the signature.
_SIGNATURE_MISMATCH = re.compile(r"unexpected keyword argument|missing \d+ required .*argument")
_LIGHTNING_CHECKPOINT_CONNECTOR = "checkpoint_connector.py"
#: Lightning's functions that load a checkpoint and restore a run from it.
_RESTORE_FUNCTIONS = frozenset({"_restore_modules_and_callbacks", "restore_training_state", "resume_start"})


class ConfigError(ValueError):
    """A config value the app cannot run with; the message names the key."""


class CheckpointError(ValueError):
    """``ckpt_path`` is missing, empty, unreadable or not a Lightning checkpoint."""


class UserError(CompactHydraException):
    """A user error raised out of a ``--multirun`` job: Hydra reports its message alone
    (no traceback) and a sweeper counts the job as failed."""


def full_error_requested() -> bool:
    """Whether ``HYDRA_FULL_ERROR=1`` asks for every traceback (as Hydra reads it)."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def one_line(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``message`` on one line (whitespace runs to one space), cut to ``limit`` chars."""
    text = " ".join(message.split())
    return text if len(text) <= limit else text[: limit - 4].rstrip() + " ..."


def _innermost(tb: TracebackType | None) -> traceback.FrameSummary | None:
    frames = traceback.extract_tb(tb)
    return frames[-1] if frames else None


def _raised_by_validation(err: BaseException, anywhere: bool = False) -> bool:
    """A ``ValueError``/``TypeError`` raised by a ``raise`` statement of this package (of
    any module if ``anywhere``) or by torch's optimizers' argument checks; not, say,
    Python's own error for ``int('x')`` deep in our code."""
    if not isinstance(err, (ValueError, TypeError)):
        return False
    frame = _innermost(err.__traceback__)
    if frame is None:
        return False
    filename = str(Path(frame.filename).resolve())
    if _TORCH_OPTIM in filename:
        return True
    in_package = anywhere or filename.startswith(str(_PACKAGE_DIR) + os.sep)
    return in_package and (frame.line or "").lstrip().startswith("raise")


def restoring_checkpoint(err: BaseException) -> bool:
    """Whether ``err`` was raised while Lightning loaded or restored ``ckpt_path``."""
    return any(
        frame.name in _RESTORE_FUNCTIONS and frame.filename.endswith(_LIGHTNING_CHECKPOINT_CONNECTOR)
        for frame in traceback.extract_tb(err.__traceback__)
    )


def _instantiated_key(err: InstantiationException) -> str | None:
    """The config key Hydra names in an instantiation error (``full_key: trainer``)."""
    for line in str(err).splitlines():
        if line.startswith("full_key:"):
            return line.split(":", 1)[1].strip() or None
    return None


def _omegaconf_message(err: OmegaConfBaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    message = lines[0] if lines else type(err).__name__
    key = getattr(err, "full_key", None)
    return f"{message} (config key: {key})" if key else message


def user_error_message(err: BaseException) -> str | None:
    """The one-line report of ``err`` if it is a user error, else None (a bug).

    User errors: :class:`ConfigError` and :class:`CheckpointError`; a missing file
    (``FileNotFoundError``, which includes a data set's ``DatasetNotFoundError``) or
    permission; OmegaConf's interpolation and value errors; Lightning's
    ``MisconfigurationException``; a ``ValueError``/``TypeError`` that a ``raise``
    statement of this package or a torch optimizer's argument check raised; and a
    config ``_target_`` (the trainer, say) that does not take the config's arguments
    or refuses their values with a ``ValueError``/``TypeError`` of its own.
    """
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    if isinstance(err, InstantiationException) and err.__cause__ is not None:
        cause = err.__cause__
        message = user_error_message(cause)
        # the target does not take the config's arguments, or refuses their values
        mismatch = isinstance(cause, TypeError) and _SIGNATURE_MISMATCH.search(str(cause)) is not None
        if message is None and (mismatch or _raised_by_validation(cause, anywhere=True)):
            message = one_line(str(cause))
        key = _instantiated_key(err)
        return f"{message} (config key: {key})" if message is not None and key else message
    if isinstance(err, (ConfigError, CheckpointError, UserError)):
        return one_line(str(err))
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return one_line(str(err))
    if isinstance(err, OmegaConfBaseException):
        return one_line(_omegaconf_message(err))
    if isinstance(err, MisconfigurationException):
        return one_line(str(err))
    if _raised_by_validation(err):
        return one_line(str(err))
    return None


def report_user_error(err: BaseException, multirun: bool = False) -> None:
    """End the job for a user error; return (for the caller to re-raise) on a bug.

    A single run prints ``Error: <message>`` to stderr and exits with
    :data:`USER_ERROR_EXIT`. A ``--multirun`` job raises :class:`UserError` instead,
    so the sweep goes on (or reports the failed job) without a traceback. With
    ``HYDRA_FULL_ERROR=1`` nothing is shortened.

    Raises:
        SystemExit: A single run's user error.
        UserError: A multirun job's user error.
    """
    message = user_error_message(err)
    if message is None or full_error_requested():
        return
    if multirun:
        raise UserError(f"Error: {message}") from err
    print(f"Error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(USER_ERROR_EXIT)


__all__ = [
    "USER_ERROR_EXIT",
    "CheckpointError",
    "ConfigError",
    "UserError",
    "full_error_requested",
    "one_line",
    "report_user_error",
    "restoring_checkpoint",
    "user_error_message",
]

"""SINGD from LightningCLI and YAML configs: SINGDCallback's typed signature, the
optimizer-callable pattern, and no "no optimizer" warning when the callback
supplies the optimizer."""

from __future__ import annotations

import functools
import inspect
import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins import MixedPrecision

from singd_lightning import KFAC, SINGD
from singd_lightning.lightning import SINGDCallback, configure_singd
from singd_lightning.lightning.callback import _optimizer_options
from singd_lightning.lightning.factory import KRONECKER_OPTIMIZERS, ModelOptimizerCallable
from singd_lightning.optim import KroneckerOptimizer
from tests.lightning.helpers import QUIET, PlainModule

pytest.importorskip("jsonargparse", reason="LightningCLI needs jsonargparse[signatures]")

_NO_OPTIMIZER = "`LightningModule.configure_optimizers` returned `None`"

#: QUIET as LightningCLI arguments, plus two training steps.
_QUIET_ARGS = [
    *(f"--trainer.{key}={str(value).lower() if isinstance(value, bool) else value}" for key, value in QUIET.items()),
    "--trainer.max_steps=2",
    "--seed_everything=0",
]


class CallableModule(PlainModule):
    """LightningCLI's optimizer-callable pattern, for an optimizer built on the module."""

    def __init__(self, optimizer: ModelOptimizerCallable = SINGD, batch_size: int = 8) -> None:
        super().__init__(batch_size=batch_size)
        self.optimizer = optimizer

    def configure_optimizers(self):
        return configure_singd(self, self.optimizer)


def _cli(model_class: type[pl.LightningModule], args: list[str]) -> LightningCLI:
    with warnings.catch_warnings():
        # LightningCLI notices pytest's own command line next to ``args``.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return LightningCLI(model_class, args=[*args, *_QUIET_ARGS], run=False, save_config_callback=None)


def _singd_callback(trainer: pl.Trainer) -> SINGDCallback:
    (callback,) = [c for c in trainer.callbacks if isinstance(c, SINGDCallback)]
    return callback


ISSUE_ARGS = [
    "--model.optimizer=none",
    "--trainer.callbacks+=singd_lightning.SINGDCallback",
    "--trainer.callbacks.init_args.lr=0.01",
    "--trainer.callbacks.init_args.structures=[diagonal, hierarchical]",
]

YAML_CONFIG = """\
model:
  optimizer: none
trainer:
  callbacks:
    - class_path: singd_lightning.SINGDCallback
      init_args:
        lr: 0.01
        structures: [diagonal, hierarchical]
"""


@pytest.mark.parametrize("source", ["command_line", "yaml"])
def test_lightning_cli_configures_the_callback(tmp_path, source):
    if source == "yaml":
        config = tmp_path / "config.yaml"
        config.write_text(YAML_CONFIG)
        args = [f"--config={config}"]
    else:
        args = ISSUE_ARGS
    cli = _cli(PlainModule, args)
    callback = _singd_callback(cli.trainer)
    assert callback.options == {"lr": 0.01, "structures": ("diagonal", "hierarchical")}

    cli.trainer.fit(cli.model)
    optimizer = cli.trainer.optimizers[0]
    assert type(optimizer) is SINGD and optimizer.steps == 2
    kronecker = [g for g in optimizer.param_groups if g["role"] == "kronecker"]
    assert kronecker and all(g["lr"] == 0.01 for g in kronecker)
    assert all(g["structures"] == ("diagonal", "hierarchical") for g in kronecker)


def test_lightning_cli_rejects_a_bad_option_when_parsing():
    with pytest.raises(ValueError, match="Unknown structure 'nope'"):
        _cli(PlainModule, [*ISSUE_ARGS[:-1], "--trainer.callbacks.init_args.structures=[diagonal, nope]"])


def test_optimizer_callable_pattern_from_the_command_line():
    cli = _cli(CallableModule, [
        "--model.optimizer=singd_lightning.SINGD",
        "--model.optimizer.lr=0.01",
        "--model.optimizer.structures=[diagonal, hierarchical]",
    ])
    cli.trainer.fit(cli.model)
    optimizer = cli.trainer.optimizers[0]
    assert type(optimizer) is SINGD and optimizer.steps == 2
    kronecker = [g for g in optimizer.param_groups if g["role"] == "kronecker"]
    assert all(g["lr"] == 0.01 and g["structures"] == ("diagonal", "hierarchical") for g in kronecker)


def test_optimizer_callable_gets_the_trainer_scaler():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    module = CallableModule(optimizer=functools.partial(SINGD, lr=0.01, T=2))
    trainer = pl.Trainer(**QUIET, max_steps=2, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    trainer.fit(module)
    assert trainer.optimizers[0].grad_scaler is scaler


def test_optimizer_callable_must_return_an_optimizer():
    with pytest.raises(TypeError, match="must return a torch Optimizer"):
        configure_singd(PlainModule(), lambda module: None)


# ------------------------------------------------------ the typed signature
def test_signature_covers_every_optimizer_option_with_its_default():
    parameters = inspect.signature(SINGDCallback.__init__).parameters
    options = {name for name, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    every = set().union(*(_optimizer_options(cls) for cls in KRONECKER_OPTIMIZERS.values()))
    assert options == every
    optimizer_defaults = {
        name: p.default
        for cls in (SINGD, KFAC, KroneckerOptimizer)
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    for name in options:
        default = parameters[name].default
        # "default": the option's default differs between the optimizers (kl_clip)
        assert default in (None, "default") or default == optimizer_defaults[name], name


@pytest.mark.parametrize(
    "optimizer, given, expected",
    [("singd", {}, 1e-3), ("singd", {"kl_clip": None}, None), ("ikfac", {}, 1e-3), ("kfac", {}, None),
     ("kfac", {"kl_clip": 1e-3}, 1e-3), ("kfac", {"kl_clip": "default"}, None)],
)
def test_kl_clip_default_is_each_optimizers_own(optimizer, given, expected):
    callback = SINGDCallback(optimizer=optimizer, **given)
    built = KRONECKER_OPTIMIZERS[optimizer](nn.Linear(3, 2), **callback.options)
    assert built.param_groups[0]["kl_clip"] == expected


@pytest.mark.parametrize(
    "options, match",
    [
        ({"structures": ("diagonal", "nope")}, "Unknown structure 'nope'"),
        ({"lr": -1.0}, r"lr must be a number in \[0.0, inf\)"),
        ({"preconditioner_dtype": "int8"}, "preconditioner_dtype entries must be"),
        ({"optimizer": "kfac", "normalize_lr_cov": True, "alpha1": 0.1}, "optimizer='kfac' does not take alpha1, normalize_lr_cov"),
        ({"optimizer": "kfac", "max_factor_step": None}, "does not take max_factor_step"),
        ({"stat_decay": 0.9}, "optimizer='singd' does not take stat_decay"),
    ],
)
def test_bad_options_fail_when_the_callback_is_created(options, match):
    with pytest.raises(ValueError, match=match):
        SINGDCallback(**options)


def test_only_set_options_are_passed_on():
    assert SINGDCallback().options == {}
    kfac = SINGDCallback("kfac", lr=0.01, stat_decay=0.9, loss_average=None, update_clip=None)
    assert kfac.options == {"lr": 0.01, "stat_decay": 0.9, "loss_average": None, "update_clip": None}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # IKFAC keeps its own alpha1 = 0: no "alpha1 is set to 0" warning
        trainer = pl.Trainer(**QUIET, max_steps=1, callbacks=[SINGDCallback("ikfac", T=1)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Lightning's own (data loader workers, ...)
            trainer.fit(PlainModule())
    assert trainer.optimizers[0].param_groups[0]["alpha1"] == 0.0


def test_kfac_gets_its_options():
    trainer = pl.Trainer(**QUIET, max_steps=1, callbacks=[SINGDCallback("kfac", stat_decay=0.5, T=1)])
    trainer.fit(PlainModule())
    optimizer = trainer.optimizers[0]
    assert type(optimizer) is KFAC and optimizer.param_groups[0]["stat_decay"] == 0.5


# --------------------------------------------------- no "no optimizer" warning
@pytest.mark.parametrize("with_callback", [True, False])
def test_no_optimizer_warning_only_without_the_callback(with_callback):
    module = PlainModule(optimizer="none")
    callbacks = [SINGDCallback(lr=0.01, T=1)] if with_callback else []
    trainer = pl.Trainer(**QUIET, max_steps=1, callbacks=callbacks)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module)
    warned = any(_NO_OPTIMIZER in str(w.message) for w in caught)
    assert warned is not with_callback
    assert "configure_optimizers" not in vars(module)  # the stand-in is gone after the fit
    assert isinstance(trainer.optimizers[0], SINGD) is with_callback


def test_batch_layers_reaches_singd_and_kfac_refuses_it():
    callback = SINGDCallback(batch_layers=True)
    assert callback.options == {"batch_layers": True}
    assert KRONECKER_OPTIMIZERS["singd"](nn.Linear(3, 2), **callback.options).batch_layers is True
    assert KRONECKER_OPTIMIZERS["ikfac"](nn.Linear(3, 2), **SINGDCallback("ikfac").options).batch_layers is None
    with pytest.raises(ValueError, match="optimizer='kfac' does not take batch_layers"):
        SINGDCallback("kfac", batch_layers=True)
    with pytest.raises(ValueError, match="batch_layers must be None, True or False"):
        SINGDCallback(batch_layers="yes")

"""SINGDCallback and the optimizer factory under real (CPU) Lightning Trainers."""

from __future__ import annotations

import copy
import csv
import warnings
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader

from singd_lightning import SINGD
from singd_lightning.lightning import SINGDCallback, SINGDDiagnostics, configure_singd
from singd_lightning.lightning.strategy import check_strategy
from singd_lightning.optim import KroneckerOptimizer
from tests.lightning.helpers import (
    QUIET,
    PlainModule,
    dataset,
    parameters,
    singd_options,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def _fit(module: pl.LightningModule, callback: pl.Callback | None = None, **trainer_kwargs) -> pl.Trainer:
    kwargs = {**QUIET, **trainer_kwargs}
    callbacks = list(kwargs.pop("callbacks", []))
    if callback is not None:
        callbacks.append(callback)
    trainer = pl.Trainer(callbacks=callbacks, **kwargs)
    trainer.fit(module)
    return trainer


def _state(optimizer: KroneckerOptimizer) -> dict[str, torch.Tensor]:
    return {
        f"{layer}.{key}": value.clone()
        for layer, values in optimizer.layer_state.items()
        for key, value in values.items()
    }


def _csv_rows(path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _assert_all_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


# ---------------------------------------------------------------- the callback
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
def test_plain_module_is_trained_by_singd(precision):
    module = PlainModule()
    before = parameters(module)
    callback = SINGDCallback(**singd_options())
    trainer = _fit(module, callback, max_steps=6, precision=precision)

    optimizer = trainer.optimizers[0]
    assert type(optimizer) is SINGD and optimizer is callback.optimizer
    assert len(trainer.optimizers) == 1 and trainer.lr_scheduler_configs[0].scheduler.optimizer is optimizer
    assert optimizer.steps == 6
    assert sorted(layer.name for layer in optimizer.layers) == ["conv", "linear"]
    for name, value in module.named_parameters():
        assert torch.isfinite(value).all(), name
        assert not torch.equal(value.float(), before[name].float()), f"{name} did not move"
    # The default keeps the optimizer's factor dtype (the parameters').
    factor_dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert optimizer.layer_state["linear"]["K"].dtype == factor_dtype
    # One epoch (6 batches) passed: the epoch StepLR halved both groups' lr.
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.025, 0.005])
    # No curvature hooks are left on the module after fitting.
    assert all(not layer.handles for layer in optimizer.layers)


def test_auto_preconditioner_dtype_under_bf16_mixed():
    callback = SINGDCallback(preconditioner_dtype="auto", **singd_options())
    trainer = _fit(PlainModule(), callback, max_steps=2, precision="bf16-mixed")
    state = trainer.optimizers[0].layer_state["conv"]
    assert state["K"].dtype == state["C"].dtype == torch.bfloat16
    assert next(PlainModule().parameters()).dtype == torch.float32


@pytest.mark.parametrize("fallback", ["adamw", "sgd"])
def test_16_true_trains_every_parameter(fallback):
    module = PlainModule()
    before = parameters(module)
    trainer = _fit(module, SINGDCallback(**singd_options(fallback=fallback)), max_steps=4, precision="16-true")
    assert trainer.optimizers[0].skipped_steps == 0
    for name, value in module.named_parameters():
        assert value.dtype == torch.float16
        assert torch.isfinite(value).all() and not torch.equal(value.float(), before[name].float()), name


def test_configure_optimizers_returning_none_gets_singd():
    module = PlainModule(optimizer="none")
    before = parameters(module)
    trainer = _fit(module, SINGDCallback(**singd_options()), max_steps=3)
    assert isinstance(trainer.optimizers[0], SINGD)
    assert all(not torch.equal(p, before[n]) for n, p in module.named_parameters())


def test_scheduler_drives_singd_learning_rates():
    module = PlainModule(scheduler={"interval": "step", "step_size": 1, "gamma": 0.5})
    seen = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append([g["lr"] for g in trainer.optimizers[0].param_groups])

    trainer = _fit(module, SINGDCallback(**singd_options()), max_steps=4, callbacks=[Record()])
    expected = [[0.05 * 0.5**k, 0.01 * 0.5**k] for k in range(5)]
    assert seen == [pytest.approx(lrs) for lrs in expected[:4]]
    assert [g["lr"] for g in trainer.optimizers[0].param_groups] == pytest.approx(expected[4])
    assert [g["role"] for g in trainer.optimizers[0].param_groups] == ["kronecker", "fallback"]


def test_multiple_optimizers_are_refused():
    class Two(PlainModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            return None

        def configure_optimizers(self):
            return [torch.optim.SGD(self.conv.parameters(), lr=0.1), torch.optim.SGD(self.linear.parameters(), lr=0.1)]

    with pytest.raises(ValueError, match="configure_singd"):
        _fit(Two(), SINGDCallback(), max_steps=1)


def test_unknown_optimizer_name():
    with pytest.raises(ValueError, match="singd, ingd, ikfac, kfac"):
        SINGDCallback(optimizer="adam")


@pytest.mark.parametrize("name, cls_name", [("ingd", "INGD"), ("ikfac", "IKFAC"), ("kfac", "KFAC")])
def test_callback_builds_the_named_optimizer(name, cls_name):
    trainer = _fit(PlainModule(), SINGDCallback(optimizer=name, lr=0.01, T=2), max_steps=2)
    assert type(trainer.optimizers[0]).__name__ == cls_name


# ----------------------------------------------- accumulation and clipping
def _reference_run(module: PlainModule, options: dict, steps_per_epoch: int, epochs: int, batch: int,
                   clip: tuple[str, float] | None) -> dict[str, torch.Tensor]:
    """Plain PyTorch: one backward per joint batch, clip, SINGD step, epoch StepLR."""
    module = module.double()
    optimizer = SINGD(module, **options)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    loader = DataLoader(dataset(module.n), batch_size=batch, shuffle=False)
    for _ in range(epochs):
        for x, y in list(loader)[:steps_per_epoch]:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(module(x.double()), y)
            loss.backward()
            if clip is not None and clip[0] == "norm":
                torch.nn.utils.clip_grad_norm_(module.parameters(), clip[1])
            elif clip is not None:
                torch.nn.utils.clip_grad_value_(module.parameters(), clip[1])
            optimizer.step()
        scheduler.step()
    return parameters(module)


@pytest.mark.parametrize("clip", [("norm", 1e9), ("norm", 1e-2), ("value", 1e-4)], ids=["huge", "norm", "value"])
def test_accumulation_equals_joint_batch_with_clipping(clip):
    options = singd_options()
    module = PlainModule(batch_size=8, n=72)
    joint = _reference_run(PlainModule(n=72), options, steps_per_epoch=3, epochs=2, batch=24, clip=clip)
    unclipped = _reference_run(PlainModule(n=72), options, steps_per_epoch=3, epochs=2, batch=24, clip=None)
    trainer = _fit(
        module,
        SINGDCallback(**options),
        max_epochs=2,
        precision="64-true",
        accumulate_grad_batches=3,
        gradient_clip_val=clip[1],
        gradient_clip_algorithm=clip[0],
    )
    assert trainer.optimizers[0].steps == 6
    got = parameters(module)
    for name in joint:
        torch.testing.assert_close(got[name], joint[name], rtol=1e-9, atol=1e-12)
    clipping_active = any(not torch.allclose(joint[n], unclipped[n], rtol=1e-6, atol=0) for n in joint)
    assert clipping_active == (clip[1] < 1.0)


# --------------------------------------------------------------- checkpoints
def test_resume_from_last_checkpoint_is_bit_identical(tmp_path):
    def run(epochs: int, ckpt_path=None, checkpoint: bool = False):
        module = PlainModule(batch_size=8, n=24, scheduler={"interval": "epoch", "step_size": 1, "gamma": 0.7})
        callback = SINGDCallback(**singd_options(T=2))
        extra = {}
        if checkpoint:
            extra = {
                "enable_checkpointing": True,
                "callbacks": [ModelCheckpoint(dirpath=tmp_path, save_last=True)],
            }
        trainer = pl.Trainer(**{**QUIET, **extra, "callbacks": [*extra.get("callbacks", []), callback]},
                             max_epochs=epochs)
        trainer.fit(module, ckpt_path=ckpt_path)
        return module, trainer

    full, full_trainer = run(4)
    run(2, checkpoint=True)
    assert (tmp_path / "last.ckpt").exists()
    checkpoint = torch.load(tmp_path / "last.ckpt")  # weights-only, PyTorch's default
    assert "kronecker" in checkpoint["optimizer_states"][0]
    resumed, resumed_trainer = run(4, ckpt_path=tmp_path / "last.ckpt")

    _assert_all_equal(parameters(resumed), parameters(full))
    a, b = resumed_trainer.optimizers[0], full_trainer.optimizers[0]
    _assert_all_equal(_state(a), _state(b))
    assert a.steps == b.steps == 12
    assert [g["lr"] for g in a.param_groups] == [g["lr"] for g in b.param_groups]


@pytest.mark.parametrize(
    "saved,resumed,match",
    [
        ({"structures": ("diagonal", "diagonal")}, {"structures": ("tril_toeplitz", "tril_toeplitz")},
         "was saved as .*diagonal.*expects .*tril_toeplitz"),
        ({"optimizer": "kfac"}, {}, "was saved as .*kfac.*expects .*singd"),
    ],
    ids=["diagonal-into-toeplitz", "kfac-into-singd"],
)
def test_resume_with_another_layout_fails_at_load_naming_the_layer(tmp_path, saved, resumed, match):
    """Lightning resume goes through the optimizer's checked load: a checkpoint
    of another structure or method is refused before training continues."""

    def run(epochs: int, options: dict, ckpt_path=None):
        options = dict(options)
        name = options.pop("optimizer", "singd")
        options = singd_options(**options)
        if name == "kfac":
            options.pop("lr_cov")
        callbacks = [SINGDCallback(name, **options),
                     ModelCheckpoint(dirpath=tmp_path, save_last=True)]
        trainer = pl.Trainer(**{**QUIET, "enable_checkpointing": True, "callbacks": callbacks}, max_epochs=epochs)
        trainer.fit(PlainModule(batch_size=8, n=24), ckpt_path=ckpt_path)
        return trainer

    run(1, saved)
    with pytest.raises(ValueError, match=match):
        run(2, resumed, ckpt_path=tmp_path / "last.ckpt")


# ------------------------------------------------------- manual optimisation
class ManualModule(PlainModule):
    def __init__(self, use_factory: bool, **kwargs):
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.use_factory = use_factory

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        x, y = batch
        optimizer.zero_grad()
        self.manual_backward(nn.functional.cross_entropy(self(x), y))
        optimizer.step()

    def configure_optimizers(self):
        if self.use_factory:
            return configure_singd(self, **singd_options())
        return torch.optim.AdamW(self.parameters())


@pytest.mark.parametrize("use_factory", [True, False], ids=["factory", "callback"])
def test_manual_optimisation_matches_plain_pytorch(use_factory):
    module = ManualModule(use_factory)
    trainer = _fit(module, None if use_factory else SINGDCallback(**singd_options()), max_steps=5)
    assert isinstance(trainer.optimizers[0], SINGD)

    reference = PlainModule()
    optimizer = SINGD(reference, **singd_options())
    for x, y in list(DataLoader(dataset(), batch_size=8))[:5]:
        optimizer.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        optimizer.step()
    _assert_all_equal(parameters(module), parameters(reference))
    _assert_all_equal(_state(trainer.optimizers[0]), _state(optimizer))


# ----------------------------------------------------------------- 16-mixed
def _fit_fp16_cpu(scale: float | None, steps: int = 4, **kwargs):
    scaler = torch.amp.GradScaler("cpu", init_scale=scale or 1.0, enabled=scale is not None)
    module = kwargs.pop("module", None) or PlainModule()
    callback = kwargs.pop("callback", None) or SINGDCallback(**singd_options())
    trainer = _fit(module, callback, max_steps=steps, plugins=[MixedPrecision("16-mixed", "cpu", scaler)], **kwargs)
    return module, trainer, scaler


def test_16_mixed_scaler_unscales_exactly_and_clipping_works():
    """Lightning's "16-mixed" flag turns into bf16 on CPU, so the plugin is given
    directly, with a CPU GradScaler. Loss scales that keep the fp16 gradients
    normal give bit-identical runs: gradients and statistics are un-scaled
    exactly (without a scaler, small fp16 gradients would underflow)."""
    scaled, scaled_trainer, scaler = _fit_fp16_cpu(2.0**12, gradient_clip_val=0.5)
    plain, plain_trainer, _ = _fit_fp16_cpu(2.0**8, gradient_clip_val=0.5)
    optimizer = scaled_trainer.optimizers[0]
    assert optimizer.grad_scaler is scaler and scaler.get_scale() == 2.0**12
    assert optimizer.steps == 4
    _assert_all_equal(parameters(scaled), parameters(plain))
    _assert_all_equal(_state(optimizer), _state(plain_trainer.optimizers[0]))
    unclipped, _, _ = _fit_fp16_cpu(2.0**12)
    assert any(not torch.equal(p, parameters(unclipped)[n]) for n, p in parameters(scaled).items())


def test_16_mixed_inf_step_is_skipped_without_state_change(tmp_path):
    snapshots = {}

    class Snapshot(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            optimizer = trainer.optimizers[0]
            snapshots[batch_idx] = (parameters(pl_module), _state(optimizer), copy.deepcopy(optimizer.state_dict()))

    module = PlainModule()
    module.poison_steps = {2}
    logger = CSVLogger(tmp_path, name="", version="")
    callback = SINGDCallback(**singd_options())
    module, trainer, scaler = _fit_fp16_cpu(
        2.0**8, steps=5, module=module, callback=callback, callbacks=[Snapshot()], logger=logger,
        log_every_n_steps=1,
    )
    optimizer = trainer.optimizers[0]
    before, after = snapshots[2], snapshots[3]
    _assert_all_equal(before[0], after[0])
    _assert_all_equal(before[1], after[1])
    assert before[2]["kronecker"]["steps"] == after[2]["kronecker"]["steps"] == 2
    assert before[2]["state"].keys() == after[2]["state"].keys()
    for key, value in before[2]["state"].items():
        for name, tensor in value.items():
            assert torch.equal(tensor, after[2]["state"][key][name])
    assert scaler.get_scale() == 2.0**7  # halved once
    assert optimizer.steps == 4 and optimizer.skipped_steps == 0
    assert callback.scaler_skipped_steps == 1
    rows = _csv_rows(tmp_path / "metrics.csv")
    assert float([r for r in rows if r["singd/skipped_steps"]][-1]["singd/skipped_steps"]) == 1.0
    assert {float(r["singd/grad_scale"]) for r in rows if r["singd/grad_scale"]} == {2.0**8, 2.0**7}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="16-mixed with Lightning's GradScaler needs CUDA")
def test_16_mixed_on_cuda():
    module = PlainModule()
    before = parameters(module)
    trainer = _fit(module, SINGDCallback(**singd_options()), max_steps=6, precision="16-mixed",
                   accelerator="cuda", gradient_clip_val=1.0)
    optimizer = trainer.optimizers[0]
    assert optimizer.grad_scaler is trainer.precision_plugin.scaler
    assert optimizer.steps + optimizer.skipped_steps >= 1
    for name, value in module.named_parameters():
        assert torch.isfinite(value).all() and not torch.equal(value.cpu(), before[name]), name


# ----------------------------------------------------------------- strategies
def test_fsdp_strategy_fails_with_clear_error():
    from lightning.pytorch.strategies import FSDPStrategy

    strategy = FSDPStrategy(use_orig_params=False)  # (with original parameters it works)
    with pytest.raises(ValueError, match=r"FSDPStrategy.*Supported strategies.*'ddp'.*'ddp_spawn'"):
        check_strategy(strategy)
    trainer = SimpleNamespace(strategy=strategy)
    with pytest.raises(ValueError, match="FSDPStrategy"):
        SINGDCallback().setup(trainer, PlainModule(), "fit")
    module = PlainModule()
    module._trainer = trainer
    with pytest.raises(ValueError, match="FSDPStrategy"):
        configure_singd(module)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning's FSDP needs CUDA")
def test_fsdp_trainer_fails_at_fit_start():
    try:
        with pytest.raises(ValueError, match="Supported strategies"):
            from lightning.pytorch.strategies import FSDPStrategy

            _fit(PlainModule(), SINGDCallback(), max_steps=1, accelerator="cuda",
                 strategy=FSDPStrategy(use_orig_params=False))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_factory_attaches_trainer_scaler():
    class Factory(PlainModule):
        def configure_optimizers(self):
            return configure_singd(self, **singd_options())

    _, trainer, scaler = _fit_fp16_cpu(2.0**4, steps=2, module=Factory(), callback=SINGDDiagnostics(False))
    assert trainer.optimizers[0].grad_scaler is scaler


# ---------------------------------------------------------------- diagnostics
def test_diagnostics_are_logged(tmp_path):
    logger = CSVLogger(tmp_path, name="", version="")
    callback = SINGDCallback(**singd_options(T=2))
    trainer = _fit(PlainModule(), callback, max_steps=6, logger=logger, log_every_n_steps=2)
    assert trainer.optimizers[0].track_diagnostics
    rows = [r for r in _csv_rows(tmp_path / "metrics.csv") if r.get("singd/update_norm_K")]
    assert [int(r["step"]) for r in rows] == [1, 3, 5]
    for row in rows:
        assert 0.0 < float(row["singd/optimizer_time_share"]) <= 1.0
        assert float(row["singd/update_norm_K"]) > 0 and float(row["singd/update_norm_C"]) > 0
        assert 0 < float(row["singd/tau_KKt_min"]) <= float(row["singd/tau_KKt_max"])
        assert 0 < float(row["singd/tau_CCt_min"]) <= float(row["singd/tau_CCt_max"])
        assert float(row["singd/skipped_steps"]) == 0.0
        assert float(row["singd/clipped_updates"]) == float(row["singd/clipped_factor_updates"]) == 0.0


def test_diagnostics_can_be_turned_off(tmp_path):
    class Logs(PlainModule):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("loss", loss)
            return loss

    logger = CSVLogger(tmp_path, name="", version="")
    callback = SINGDCallback(log_diagnostics=False, **singd_options(T=2))
    trainer = _fit(Logs(), callback, max_steps=4, logger=logger, log_every_n_steps=1)
    assert not trainer.optimizers[0].track_diagnostics
    with open(tmp_path / "metrics.csv") as f:
        header = next(csv.reader(f))
    assert "loss" in header and not any(name.startswith("singd/") for name in header)


def test_diagnostics_with_factory_and_no_logger():
    class Factory(PlainModule):
        def configure_optimizers(self):
            return configure_singd(self, **singd_options())

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|LeafSpec).*")
        trainer = _fit(Factory(), SINGDDiagnostics(), max_steps=2)
    assert not trainer.optimizers[0].track_diagnostics  # logger=False: nothing to log

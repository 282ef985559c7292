"""The CUDA paths that a CPU cannot show: 16-mixed with Lightning's own CUDA
GradScaler, bf16-mixed and bf16-true, and a checkpoint resume on the device.

Skipped without CUDA; ``pytest -m cuda`` (``scripts/gpu_check.sh``) runs them.
Results are compared with tight tolerances rather than bit for bit, as cuDNN
may pick non-deterministic kernels; each property checked would break by far
more than the tolerance (a statistic left scaled is off by the scale squared).
"""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision

from singd_lightning.lightning import SINGDCallback
from tests.lightning.helpers import QUIET, PlainModule, parameters, singd_options

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning"),
]

CLOSE = {"rtol": 1e-5, "atol": 1e-6}


def _fit(module: pl.LightningModule, callback: pl.Callback, ckpt_path=None, **trainer_kwargs) -> pl.Trainer:
    kwargs = {**QUIET, "accelerator": "cuda", **trainer_kwargs}
    trainer = pl.Trainer(callbacks=[*kwargs.pop("callbacks", []), callback], **kwargs)
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def _state(optimizer) -> dict[str, torch.Tensor]:
    return {f"{layer}.{k}": v.detach().cpu().clone() for layer, s in optimizer.layer_state.items() for k, v in s.items()}


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.cpu() for k, v in tensors.items()}


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), **CLOSE, msg=key)


def _fit_fp16(scale: float, steps: int = 4, **kwargs) -> tuple[PlainModule, pl.Trainer, torch.amp.GradScaler]:
    """16-mixed with Lightning's plugin around a CUDA GradScaler of the given initial scale."""
    scaler = torch.amp.GradScaler("cuda", init_scale=scale)
    module = kwargs.pop("module", None) or PlainModule()
    callback = kwargs.pop("callback", None) or SINGDCallback(**singd_options())
    trainer = _fit(module, callback, max_steps=steps, plugins=[MixedPrecision("16-mixed", "cuda", scaler)], **kwargs)
    return module, trainer, scaler


def test_16_mixed_statistics_are_unscaled_by_the_cuda_scaler():
    """Two loss scales that keep fp16 gradients normal train the same model."""
    high, high_trainer, scaler = _fit_fp16(2.0**12)
    low, low_trainer, _ = _fit_fp16(2.0**6)
    optimizer = high_trainer.optimizers[0]
    assert optimizer.grad_scaler is scaler and scaler.get_scale() == 2.0**12
    assert optimizer.steps == 4 and optimizer.skipped_steps == 0
    assert all(v.is_cuda for s in optimizer.layer_state.values() for k, v in s.items() if k != "updates")
    _assert_close(_cpu(parameters(high)), _cpu(parameters(low)))
    _assert_close(_state(optimizer), _state(low_trainer.optimizers[0]))


def test_16_mixed_inf_step_is_skipped_without_touching_state():
    snapshots = {}

    class Snapshot(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            optimizer = trainer.optimizers[0]
            snapshots[batch_idx] = (_cpu(parameters(pl_module)), _state(optimizer), copy.deepcopy(optimizer.state_dict()))

    module = PlainModule()
    module.poison_steps = {2}
    callback = SINGDCallback(**singd_options())
    _, trainer, scaler = _fit_fp16(2.0**8, steps=5, module=module, callback=callback, callbacks=[Snapshot()])
    before, after = snapshots[2], snapshots[3]
    for key, value in before[0].items():
        assert torch.equal(value, after[0][key]), key
    for key, value in before[1].items():
        assert torch.equal(value, after[1][key]), key
    assert before[2]["kronecker"]["steps"] == after[2]["kronecker"]["steps"] == 2
    for key, value in before[2]["state"].items():
        for name, tensor in value.items():
            assert torch.equal(tensor, after[2]["state"][key][name]), (key, name)
    assert scaler.get_scale() == 2.0**7  # halved once
    optimizer = trainer.optimizers[0]
    assert optimizer.steps == 4 and optimizer.skipped_steps == 0
    assert callback.scaler_skipped_steps == 1


@pytest.mark.parametrize("precision,factor_dtype", [("bf16-mixed", None), ("bf16-true", torch.bfloat16)])
def test_bf16_trains_on_cuda(precision, factor_dtype):
    module = PlainModule()
    before = parameters(module)
    trainer = _fit(module, SINGDCallback(**singd_options()), max_steps=6, precision=precision)
    optimizer = trainer.optimizers[0]
    assert optimizer.steps == 6 and optimizer.skipped_steps == 0
    for name, value in module.named_parameters():
        assert value.is_cuda and torch.isfinite(value).all(), name
        assert not torch.equal(value.detach().float().cpu(), before[name].float()), name
    for layer, state in optimizer.layer_state.items():
        for key in ("K", "C"):
            assert state[key].is_cuda and torch.isfinite(state[key]).all(), (layer, key)
            if factor_dtype is not None:
                assert state[key].dtype == factor_dtype, (layer, key)


@pytest.mark.parametrize("optimizer", ["singd", "kfac"])
def test_resume_from_a_cuda_checkpoint_continues_the_run(tmp_path, optimizer):
    def run(epochs: int, ckpt_path=None, checkpoint: bool = False):
        module = PlainModule(batch_size=8, n=24, scheduler={"interval": "epoch", "step_size": 1, "gamma": 0.7})
        callback = SINGDCallback(optimizer, **singd_options(T=2))
        extra = {}
        if checkpoint:
            extra = {"enable_checkpointing": True, "callbacks": [ModelCheckpoint(dirpath=tmp_path, save_last=True)]}
        trainer = _fit(module, callback, ckpt_path=ckpt_path, max_epochs=epochs, **extra)
        return module, trainer

    full, full_trainer = run(4)
    run(2, checkpoint=True)
    resumed, resumed_trainer = run(4, ckpt_path=tmp_path / "last.ckpt")
    a, b = resumed_trainer.optimizers[0], full_trainer.optimizers[0]
    assert a.steps == b.steps == 12
    _assert_close(_cpu(parameters(resumed)), _cpu(parameters(full)))
    _assert_close(_state(a), _state(b))
    for state in a.layer_state.values():
        for key, value in state.items():
            # Host counters stay on the host (no sync to read them), factors on the device.
            assert value.device.type == ("cpu" if key == "updates" else "cuda"), key
    for p, st in a.state.items():
        assert all(v.device == p.device for k, v in st.items() if k != "step")

"""The app's ``compile`` option: the network is compiled in place and trains."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from torch._dynamo.utils import counters

from singd_lightning.app.errors import ConfigError
from singd_lightning.app.pipeline import build_model, train
from singd_lightning.app.validation import compile_backend, validate_config
from tests.app.helpers import FAST, compose_cfg

DIGITS = SimpleNamespace(num_classes=10, in_chans=1)


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def test_compile_defaults_to_eager_network():
    net = build_model(compose_cfg(), DIGITS)
    assert net._compiled_call_impl is None


def test_compile_compiles_the_network_in_place():
    net = build_model(compose_cfg(["compile=true"]), DIGITS)
    assert net._compiled_call_impl is not None
    assert not any("_orig_mod" in name for name in net.state_dict())


@pytest.mark.parametrize(("value", "backend"), [(True, "inductor"), (False, None), ("aot_eager", "aot_eager")])
def test_compile_option_names_a_backend(value, backend):
    assert compile_backend(value) == backend


def test_unknown_compile_backend_is_a_config_error():
    with pytest.raises(ConfigError, match=r"compile: 'fast' is not a torch.compile backend; valid: true, false, eager"):
        build_model(compose_cfg(["compile=fast"]), DIGITS)
    # ... refused before anything is built
    with pytest.raises(ConfigError, match=r"compile: expected true, false or a torch.compile backend name, got 3"):
        validate_config(compose_cfg(["compile=3"]))


def test_fit_with_a_compiled_network(tmp_path: Path):
    cfg = compose_cfg(["compile=aot_eager", "structure=diagonal", "test=false", *FAST], output_dir=tmp_path)
    results = train(cfg)
    assert results["status"] == "ok", results.get("error")
    assert results["global_step"] == 2
    # The network ran compiled, in whole graphs (training and evaluation).
    assert counters["stats"]["unique_graphs"] >= 1
    assert sum(counters["graph_break"].values()) == 0

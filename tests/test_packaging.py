"""The package as users install it: a wheel that runs the app from any folder,
and an optimizer core that imports nothing but torch."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_core_imports_torch_only():
    code = (
        "import sys\n"
        "from singd_lightning import SINGD, KFAC\n"
        "from singd_lightning.structures import STRUCTURES\n"
        "heavy = sorted(m for m in ('lightning', 'hydra', 'omegaconf', 'timm', 'wandb', 'sklearn', "
        "'matplotlib', 'torchvision', 'pandas') if m in sys.modules)\n"
        "print(heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_wheel_ships_the_configs_and_runs_the_app_from_any_folder(tmp_path):
    """Build the wheel, unpack it into a folder of its own (not the checkout),
    and ask the app for its help and its composed config from another folder."""
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("singd_lightning-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "singd_lightning/conf/train.yaml" in names
    assert "singd_lightning/conf/optimizer/singd.yaml" in names
    assert "singd_lightning/conf/recipe/optimizer/paper_kfac.yaml" in names  # a nested group
    assert "singd_lightning/py.typed" in names
    assert any(name.endswith("licenses/LICENSE") for name in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # Only the unpacked wheel on the path: the checkout's editable install is hidden.
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1"}
    env.pop("SINGD_CONFIG_DIR", None)
    probe = (
        "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__module__.lower()]\n"
        "import singd_lightning.app.hydra_utils as h\n"
        "assert str(h.config_dir()).startswith(sys.argv[1]), h.config_dir()\n"
        "sys.argv = ['singd-train', '--cfg', 'job', 'optimizer=adamw']\n"
        "from singd_lightning.app.train import main\n"
        "main()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, str(site)], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "name: adamw" in result.stdout

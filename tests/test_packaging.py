"""A wheel of the package carries conf/ (Hydra's configs), and an installed (not editable) copy composes
them from any working directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from gridvqa.config import REPO_ROOT, conf_dir

# what a wheel is built from
SOURCES = ("pyproject.toml", "README.md", "src", "conf")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The package's wheel, built offline from a copy of the sources (the build leaves the checkout as is)."""
    tmp = tmp_path_factory.mktemp("wheel")
    tree = tmp / "tree"
    tree.mkdir()
    for name in SOURCES:
        src = REPO_ROOT / name
        if src.is_dir():
            shutil.copytree(
                src, tree / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
            )
        else:
            shutil.copy2(src, tree / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
           "-w", str(tmp / "dist"), str(tree)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = (tmp / "dist").glob("gridvqa-*.whl")
    return whl


def test_checkout_reads_the_repository_conf():
    assert Path(conf_dir()) == REPO_ROOT / "conf"
    link = REPO_ROOT / "src" / "gridvqa" / "conf"
    assert link.is_symlink() and link.resolve() == REPO_ROOT / "conf"


def test_wheel_carries_every_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"gridvqa/conf/train.yaml", "gridvqa/conf/experiment/e2e.yaml"} <= names
    shipped = {n.removeprefix("gridvqa/conf/") for n in names if n.startswith("gridvqa/conf/")}
    in_repo = {p.relative_to(REPO_ROOT / "conf").as_posix() for p in (REPO_ROOT / "conf").rglob("*.yaml")}
    assert shipped == in_repo


def test_installed_wheel_composes_its_configs_anywhere(wheel, tmp_path):
    """Installed into its own folder (the editable checkout stays out of its way), run from elsewhere."""
    site = tmp_path / "site"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site),
         str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    probe = (
        "import gridvqa, gridvqa.config as c\n"
        "from hydra import compose, initialize_config_dir\n"
        "c.register_resolvers()\n"
        "with initialize_config_dir(config_dir=c.conf_dir(), version_base='1.3'):\n"
        "    cfg = compose('train', overrides=['experiment=e2e'])\n"
        "print(gridvqa.__file__)\n"
        "print(c.conf_dir())\n"
        "print(cfg.task_name, cfg.model.backbone_trainable)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "GRIDVQA_CONF_DIR"}
    env["PYTHONPATH"] = str(site)
    work = tmp_path / "elsewhere"
    work.mkdir()
    r = subprocess.run([sys.executable, "-c", probe], cwd=work, env=env, capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    module, conf, composed = r.stdout.splitlines()[-3:]
    assert Path(module).is_relative_to(site) and Path(conf) == site / "gridvqa" / "conf"
    assert composed == "e2e True"
    # the real entry point finds the same configs (Hydra prints the composed job config)
    r = subprocess.run([sys.executable, "-m", "gridvqa.train", "experiment=frozen", "--cfg", "job"], cwd=work,
                       env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "task_name: frozen" in r.stdout

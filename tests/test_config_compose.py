"""gridvqa.config.compose_config: the one way tests, benchmarks and `reproduce` compose the Hydra configs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, OverrideParseException

from gridvqa.config import compose_config


def test_composes_an_experiment_with_overrides_and_without_the_hydra_node():
    cfg = compose_config("train", ["experiment=e2e", "data.batch_size=3"])
    assert cfg.task_name == "e2e"
    assert cfg.model.backbone_trainable is True  # from conf/experiment/e2e.yaml
    assert cfg.data.batch_size == 3
    assert "hydra" not in cfg
    assert compose_config("train").task_name == "train"


def test_return_hydra_config_keeps_the_choices_made():
    cfg = compose_config("train", ["experiment=e2e"], return_hydra_config=True)
    assert cfg.hydra.runtime.choices["experiment"] == "e2e"
    assert cfg.hydra.runtime.choices["data"] == "vqa"


def test_output_dir_composes_as_a_run_sees_it(tmp_path):
    run = tmp_path / "run"
    cfg = compose_config("train", ["experiment=e2e"], output_dir=run)
    assert "hydra" not in cfg
    assert cfg.paths.output_dir == str(run)  # ${hydra:runtime.output_dir}, resolved through HydraConfig
    assert HydraConfig.get().runtime.output_dir == str(run)
    assert HydraConfig.get().job.num == 0

    kept = compose_config("train", [], return_hydra_config=True, output_dir=tmp_path / "other")
    assert kept.hydra.runtime.output_dir == str(tmp_path / "other")
    assert kept.paths.output_dir == str(tmp_path / "other")


def test_hydra_errors_propagate_and_leave_hydra_clear():
    with pytest.raises(ConfigCompositionException, match="no_such_key"):
        compose_config("train", ["experiment=e2e", "model.no_such_key=1"])
    assert not GlobalHydra.instance().is_initialized()
    with pytest.raises(OverrideParseException):
        compose_config("train", ["data.batch_size=[1,"])
    with pytest.raises(ConfigCompositionException, match="no_such_experiment"):
        compose_config("train", ["experiment=no_such_experiment"])
    # a failed compose does not stop the next one
    assert compose_config("train", ["data.batch_size=5"]).data.batch_size == 5
    assert not GlobalHydra.instance().is_initialized()


def test_another_config_dir(tmp_path):
    (tmp_path / "tiny.yaml").write_text("size: 1\nname: ${repo_root:}\n", encoding="utf-8")
    cfg = compose_config("tiny", ["size=2"], config_dir=tmp_path)
    assert cfg.size == 2
    assert Path(cfg.name).is_dir()  # the project's resolvers are registered
    with pytest.raises(Exception, match="train"):
        compose_config("train", config_dir=tmp_path)


def test_importing_the_module_does_not_import_hydra():
    code = "import sys, gridvqa.config; assert 'hydra' not in sys.modules and 'omegaconf' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)

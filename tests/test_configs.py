"""Every experiment file composes and resolves; the entry point finds conf/ from any directory."""

import pytest
from omegaconf import OmegaConf

from feature_files import write_features
from gridvqa.errors import ConfigError, find_user_error
from gridvqa.models.mcan import MCAN_SIZES, mcan_config
from hydra_utils import EXPERIMENTS, compose_cfg


@pytest.fixture
def vocab_root(tmp_path):
    (tmp_path / "vg").mkdir()
    (tmp_path / "vg" / "objects_vocab.txt").write_text("circle\nsquare\ntriangle\n")
    (tmp_path / "vg" / "attributes_vocab.txt").write_text("red\nblue\n")
    (tmp_path / "answers.json").write_text('{"answers": ["yes", "no", "2"]}')
    return tmp_path


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_resolves(name, vocab_root, tiny_shapes):
    if "region" in name or "frozen_h5" in name or "frozen_x152" in name:  # widths from the feature files
        vocab_root = tiny_shapes
        for kind in ("grid", "region"):
            if not (tiny_shapes / "features" / f"{kind}_train.h5").is_file():
                write_features(tiny_shapes, kind, "train")
    cfg = compose_cfg([f"experiment={name}"], vocab_root)
    OmegaConf.resolve(cfg)
    assert cfg.task_name and cfg.optimized_metric
    assert "_target_" in cfg.model and "_target_" in cfg.data and "_target_" in cfg.trainer


@pytest.mark.parametrize("name", [n for n in EXPERIMENTS if n.startswith("paper_") and "region" not in n
                                  and "frozen_x152" not in n])
def test_paper_heads_keep_mcan_sizes(name, vocab_root):
    """The pixel paper files share their setting with the CPU experiments; their head is still MCAN's own
    size (FFN 4 x hidden, dropout 0.1), none of the CPU size's."""
    cfg = compose_cfg([f"experiment={name}"], vocab_root)
    head = OmegaConf.to_container(cfg.model.head, resolve=True)
    built = mcan_config(**head)
    assert (built.ffn, built.dropout) == (MCAN_SIZES[head["size"]].ffn, 0.1)


def test_vocab_sizes_come_from_data(vocab_root):
    cfg = compose_cfg(["experiment=pretrain_vg"], vocab_root)
    assert cfg.model.num_classes == 3 and cfg.model.num_attributes == 2


def test_missing_features_name_the_command(tmp_path):
    cfg = compose_cfg(["experiment=region"], tmp_path)
    with pytest.raises(Exception) as ei:
        OmegaConf.resolve(cfg)
    err = find_user_error(ei.value)
    assert isinstance(err, ConfigError)
    cmd = "python -m gridvqa.extract kind=region split=train"
    assert f"region_train.h5: features not found (make them with: {cmd})" in str(err)


def test_wandb_offline_unless_a_key_is_configured(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    cfg = compose_cfg(["logger=wandb"], tmp_path)
    assert cfg.logger.wandb.offline is True
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert compose_cfg(["logger=wandb"], tmp_path).logger.wandb.offline is False
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert compose_cfg(["logger=many"], tmp_path).logger.wandb.offline is True


def test_each_process_of_a_torchrun_or_slurm_launch_gets_its_own_run_folder(monkeypatch):
    import yaml

    from gridvqa.config import REPO_ROOT, register_resolvers

    register_resolvers()
    run_dir = yaml.safe_load((REPO_ROOT / "conf" / "hydra" / "default.yaml").read_text())["run"]["dir"]
    prefix = "${paths.log_dir}/${task_name}/runs/${now:%Y-%m-%d}_${now:%H-%M-%S}"  # Hydra's parts
    assert run_dir.startswith(prefix)
    node = OmegaConf.create({"dir": "t" + run_dir.removeprefix(prefix)})
    cases = [({}, "t"), ({"RANK": "0"}, "t"), ({"RANK": "3"}, "t_rank3"), ({"SLURM_PROCID": "2"}, "t_rank2")]
    for env, want in cases:
        monkeypatch.delenv("RANK", raising=False)
        monkeypatch.delenv("SLURM_PROCID", raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert node.dir == want, env

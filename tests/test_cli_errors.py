"""What a user who gets something wrong sees: one line naming the key or file, exit status 1, no traceback,
nothing already written lost; a bug still shows its traceback. Library checks first (quick), then a few
real `python -m gridvqa.<entry>` subprocesses."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from gridvqa.cli import run_task
from gridvqa.config_checks import (
    apply_data_root,
    check_evaluate,
    check_extract,
    check_train,
    check_writable,
)
from gridvqa.errors import ConfigError, DataError, user_error_line
from gridvqa.models.safe_load import (
    UnsafePickleError,
    check_resume_checkpoint,
    load_state_dict_file,
    load_torch_file,
)
from hydra_utils import compose_cfg

REPO = Path(__file__).resolve().parents[1]


class RunsCode:
    """A pickle whose loading would run a shell command (creating `marker`)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def hostile_checkpoint(path: Path, marker: Path, legacy: bool = False) -> Path:
    torch.save({"state_dict": {"w": torch.ones(2)}, "x": RunsCode(marker)}, path,
               _use_new_zipfile_serialization=not legacy)
    return path


def unwritable(tmp_path: Path) -> Path:
    """A folder path under a regular file: not writable for anyone, root included."""
    f = tmp_path / "file.txt"
    f.write_text("keep me")
    return f / "sub"


# ---------------------------------------------------------------------------------------------------
# config values: the key, the value and what is allowed


@pytest.mark.parametrize(("override", "message"), [
    ("data.batch_size=abc", "data.batch_size=abc: expected an integer >= 1"),
    ("data.batch_size=0", "data.batch_size=0: expected an integer >= 1"),
    ("data.image_size=[0,0]", r"data.image_size=\[0,0\]: expected \[height,width\]"),
    ("data.image_size=0", r"data.image_size=0: expected \[height,width\]"),
    ("model.lr=-1", "model.lr=-1: expected a number > 0"),
    ("data.num_workers=-1", "data.num_workers=-1: expected an integer >= 0"),
])
def test_train_config_values(tiny_shapes, tmp_path, override, message):
    cfg = compose_cfg([override], tiny_shapes, tmp_path / "run")
    with pytest.raises(ConfigError, match=f"^{message}"):
        check_train(cfg)


def test_good_configs_pass(tiny_shapes, tmp_path):
    for name, check in (("train", check_train), ("extract", check_extract), ("evaluate", check_evaluate)):
        check(compose_cfg([], tiny_shapes, tmp_path / "run", config_name=name))
    check_train(compose_cfg(["experiment=pretrain_vg", "data.train_short=[96,112]"], tiny_shapes, tmp_path))


@pytest.mark.parametrize(("override", "message"), [
    ("image_size=[0,0]", r"image_size=\[0,0\]: expected \[height,width\]"),
    ("batch_size=abc", "batch_size=abc: expected an integer >= 1"),
    ("split=vall", "split=vall: expected a VQA split: test | test-dev"),
    ("num_workers=-1", "num_workers=-1: expected an integer >= 0"),
    ("dtype=int8", "dtype=int8: expected one of float16 | float32"),
    ("image_size=null", "image_size=null needs short=S"),
    ("preprocess=gpu", "preprocess=gpu: expected one of auto | workers | device"),
    ("merge=yes", "merge=yes: expected one of auto | only | off"),
    ("shards=0", "shards=0: expected an integer >= 1"),
    ("shard=-1", "shard=-1: expected an integer >= 0"),
])
def test_extract_config_values(tiny_shapes, tmp_path, override, message):
    cfg = compose_cfg([override], tiny_shapes, tmp_path / "run", config_name="extract")
    with pytest.raises(ConfigError, match=f"^{message}"):
        check_extract(cfg)


def test_evaluate_config_values(tiny_shapes, tmp_path):
    for override, message in (("batch_size=0", "batch_size=0: expected an integer >= 1"),
                              ("device=gpu", "device=gpu: expected auto | cpu"),
                              ("split=vall", "split=vall: expected a VQA split")):
        cfg = compose_cfg([override], tiny_shapes, tmp_path / "run", config_name="evaluate")
        with pytest.raises(ConfigError, match=f"^{message}"):
            check_evaluate(cfg)


def test_data_root_alias_feeds_paths(tiny_shapes, tmp_path):
    for name in ("train", "extract", "evaluate", "visualize", "predict"):
        cfg = compose_cfg([f"data_root={tmp_path / 'elsewhere'}"], config_name=name)
        apply_data_root(cfg)
        assert cfg.paths.data_root == str(tmp_path / "elsewhere")
    cfg = compose_cfg([f"data_root={tiny_shapes}"])
    apply_data_root(cfg)
    assert cfg.data.data_root == str(tiny_shapes)
    assert cfg.model.answers_path == str(tiny_shapes / "answers.json")
    cfg = compose_cfg([f"data_root={tiny_shapes}"], config_name="extract")
    apply_data_root(cfg)
    assert cfg.output == str(tiny_shapes / "features" / "grid_val.h5")


# ---------------------------------------------------------------------------------------------------
# outputs are checked before the work starts


def test_check_writable(tmp_path):
    bad = unwritable(tmp_path)
    with pytest.raises(ConfigError, match=f"^out={bad}/r.json: cannot be written: {tmp_path}/file.txt is a "):
        check_writable(bad / "r.json", "out")
    with pytest.raises(ConfigError, match="is a folder, expected a file path"):
        check_writable(tmp_path, "out")
    with pytest.raises(ConfigError, match="is a file, expected a folder"):
        check_writable(tmp_path / "file.txt", "out", folder=True)
    new = tmp_path / "new" / "deeper" / "r.json"
    assert check_writable(new, "out") == new
    assert not (tmp_path / "new").exists()  # checking creates nothing
    assert (tmp_path / "file.txt").read_text() == "keep me"


def test_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: a 0o555 folder is writable")
        with pytest.raises(ConfigError, match="is not writable"):
            check_writable(ro / "x.h5", "output")
    finally:
        ro.chmod(0o755)


def test_unwritable_outputs_fail_the_train_check(tiny_shapes, tmp_path):
    bad = unwritable(tmp_path)
    cfg = compose_cfg([f"paths.artifacts_dir={bad}"], tiny_shapes, tmp_path / "run")
    with pytest.raises(ConfigError, match="^callbacks.publish_checkpoint.path=.*file.txt is a file"):
        check_train(cfg)
    cfg = compose_cfg(["experiment=pretrain_vg", f"paths.artifacts_dir={bad}"], tiny_shapes, tmp_path / "run")
    with pytest.raises(ConfigError, match="^callbacks.publish_checkpoint.path=|^model.export_dir="):
        check_train(cfg)
    cfg = compose_cfg([f"output={bad}/grid_val.h5"], tiny_shapes, tmp_path / "run", config_name="extract")
    with pytest.raises(ConfigError, match="^output="):
        check_extract(cfg)


# ---------------------------------------------------------------------------------------------------
# checkpoints: missing, hostile, old


def test_resume_checkpoint_refusals(tmp_path):
    marker = tmp_path / "PWNED"
    with pytest.raises(ConfigError, match=r"^ckpt_path=.*nope\.ckpt: checkpoint to resume from not found"):
        check_resume_checkpoint(tmp_path / "nope.ckpt")
    for legacy in (False, True):
        path = hostile_checkpoint(tmp_path / f"evil_{legacy}.ckpt", marker, legacy)
        kind = r" \(legacy non-zip torch file\)" if legacy else ""
        refused = rf"evil_{legacy}\.ckpt: refused to load this checkpoint to resume from \(ckpt_path\){kind}"
        with pytest.raises(UnsafePickleError, match=rf"{refused}: it holds posix\.system"):
            check_resume_checkpoint(path)
        assert user_error_line(pytest.raises(UnsafePickleError, load_torch_file, path).value).count("\n") == 0
    assert not marker.exists()  # refused before anything ran

    from omegaconf import OmegaConf

    old = tmp_path / "old.ckpt"  # checkpoints of older versions held omegaconf objects
    torch.save({"state_dict": {"w": torch.ones(1)}, "hyper_parameters": OmegaConf.create({"a": 1})}, old)
    with pytest.raises(UnsafePickleError, match=r"old\.ckpt: .*it holds omegaconf\.dictconfig\.DictConfig"):
        check_resume_checkpoint(old)
    plain = tmp_path / "plain.ckpt"
    torch.save([1, 2], plain)
    with pytest.raises(DataError, match=r"not a Lightning checkpoint"):
        check_resume_checkpoint(plain)
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "epoch": 1}, good)
    check_resume_checkpoint(good)


def test_legacy_torch_file_says_what_it_is(tmp_path):
    path = tmp_path / "number.pth"
    torch.save(7, path, _use_new_zipfile_serialization=False)
    with pytest.raises(DataError, match=r"number\.pth: holds a int, expected a state dict"):
        load_state_dict_file(path)
    marker = tmp_path / "PWNED"
    evil = hostile_checkpoint(tmp_path / "evil.pth", marker, legacy=True)
    with pytest.raises(UnsafePickleError, match=r"evil\.pth: refused .*legacy non-zip torch file.*system"):
        load_state_dict_file(evil)
    assert not marker.exists()


def tiny_module(root: Path, **kw):
    from gridvqa.data import layout
    from gridvqa.data.vqa2 import AnswerVocab
    from gridvqa.lit.vqa_module import VQAModule

    kw.setdefault("tokenizer_dir", str(layout.tokenizer_dir(root)))
    return VQAModule(source="region_h5", visual_dim=8, head={"size": "tiny"},
                     answers=AnswerVocab.load(layout.answers_path(root)).answers, **kw)


def test_init_from_hostile_is_refused(tiny_shapes, tmp_path):
    marker = tmp_path / "PWNED"
    evil = hostile_checkpoint(tmp_path / "evil.ckpt", marker)
    module = tiny_module(tiny_shapes)
    with pytest.raises(UnsafePickleError, match=r"evil\.ckpt: refused to load this model\.init_from "):
        module.load_vqa_weights(str(evil))
    assert not marker.exists()


def test_tokenizer_json_that_is_not_utf8_json(tiny_shapes, tmp_path):
    from gridvqa.data.text import load_tokenizer

    tok = tmp_path / "tokenizer"
    shutil.copytree(tiny_shapes / "tokenizer", tok)
    for payload, what in ((b"\xff\xfe SECRET-PAYLOAD \x00\x81", "not UTF-8 text"),
                          (b"SECRET-PAYLOAD, not json", "not JSON")):
        (tok / "tokenizer.json").write_bytes(payload)
        for load in (lambda: load_tokenizer(tok), lambda: tiny_module(tiny_shapes, tokenizer_dir=str(tok))):
            with pytest.raises(DataError, match=rf"^{tok}/tokenizer\.json: {what}") as e:
                load()
            assert "SECRET" not in str(e.value) and "\n" not in str(e.value)


def test_text_encoder_with_custom_code_is_refused(tmp_path):
    from gridvqa.models.text_encoder import HFTextEncoder

    d = tmp_path / "encoder"
    d.mkdir()
    marker = tmp_path / "RAN"
    (d / "config.json").write_text('{"model_type": "custom_x", "hidden_size": 8, "auto_map": '
                                   '{"AutoConfig": "custom.XConfig", "AutoModel": "custom.XModel"}}')
    (d / "custom.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    with pytest.raises(ConfigError, match=f"^{d}: cannot load a transformers model: .*custom code"):
        HFTextEncoder(d, hidden=8)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------
# the shared wrapper


def test_wrapper_one_line_for_user_errors_traceback_for_bugs(capsys):
    def wrapped_config_error(cfg):
        try:
            raise ConfigError("model.lr=-1: expected a number > 0\n(second line)")
        except ConfigError as e:
            raise RuntimeError("Error in call to target 'x'") from e  # as Hydra's instantiate wraps it

    def computed_then_failed(cfg):
        print("the score: 42")
        raise PermissionError(errno.EACCES, "Permission denied", "/somewhere/out.json")

    def bug(cfg):
        raise KeyError("a bug")

    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"data_root": None})
    for body, line in ((wrapped_config_error, "error: model.lr=-1: expected a number > 0; (second line)"),
                       (computed_then_failed, "error: /somewhere/out.json: Permission denied")):
        with pytest.raises(SystemExit) as e:
            run_task(body, cfg)
        assert e.value.code == 1
        out, err = capsys.readouterr()
        assert err.splitlines() == [line]
        assert out == ("the score: 42\n" if body is computed_then_failed else "")
    with pytest.raises(KeyError, match="a bug"):
        run_task(bug, cfg)
    assert user_error_line(RuntimeError("x")) is None
    assert user_error_line(OSError(errno.EIO, "I/O error")) is None  # no file named: not ours to explain


# ---------------------------------------------------------------------------------------------------
# publishing


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.steps = 0

    def training_step(self, batch, batch_idx):
        self.steps += 1
        return self.layer(batch[0]).sum()

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(4, 2))
        return torch.utils.data.DataLoader(data, batch_size=2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(tmp_path: Path, path: Path, **trainer_kw) -> Tiny:
    from gridvqa.lit.callbacks import PublishCheckpoint

    model = Tiny()
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[PublishCheckpoint(str(path))], **trainer_kw)
    trainer.fit(model)
    return model


def test_fast_dev_run_never_replaces_a_published_model(tmp_path):
    real = tmp_path / "artifacts" / "e2e" / "model.ckpt"
    fit(tmp_path, real, fast_dev_run=True)  # nothing there yet: published (tests, reproduce's dry runs)
    assert real.is_file()
    real.write_bytes(b"the real model")
    fit(tmp_path, real, fast_dev_run=True)
    assert real.read_bytes() == b"the real model"
    fit(tmp_path, real, max_steps=1, enable_checkpointing=False)  # a real run does replace it
    assert real.read_bytes() != b"the real model"
    assert load_torch_file(real)["state_dict"]


def test_unwritable_publish_path_fails_before_training(tmp_path):
    bad = unwritable(tmp_path) / "model.ckpt"
    with pytest.raises(ConfigError, match=f"^callbacks.publish_checkpoint.path={bad}: cannot be written"):
        fit(tmp_path, bad, max_steps=2, enable_checkpointing=False)


DDP_PUBLISH = textwrap.dedent("""
    import sys
    import pytorch_lightning as pl
    import torch
    from gridvqa.lit.callbacks import PublishCheckpoint

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).sum()

        def train_dataloader(self):
            data = torch.utils.data.TensorDataset(torch.randn(8, 2))
            return torch.utils.data.DataLoader(data, batch_size=2)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    if __name__ == "__main__":
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, fast_dev_run=True,
                             enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=sys.argv[2], callbacks=[PublishCheckpoint(sys.argv[1])])
        trainer.fit(Tiny())
        open(f"{sys.argv[2]}/finished_rank{trainer.global_rank}", "w").close()
""")


@pytest.mark.slow
def test_ddp_fast_dev_run_publishes_from_rank_zero(tmp_path):
    """No checkpoint file to copy (fast_dev_run saves none): the model is saved with every rank taking part
    in Trainer.save_checkpoint, not by rank 0 alone waiting for the others at its barrier."""
    script = tmp_path / "ddp_publish.py"
    script.write_text(DDP_PUBLISH)
    published = tmp_path / "artifacts" / "model.ckpt"
    (tmp_path / "run").mkdir()

    def run_ddp() -> None:
        proc = subprocess.run([sys.executable, str(script), str(published), str(tmp_path / "run")],
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        for rank in (0, 1):
            (tmp_path / "run" / f"finished_rank{rank}").unlink()  # both processes got to the end

    run_ddp()
    assert load_torch_file(published)["state_dict"]
    assert [p.name for p in published.parent.iterdir()] == ["model.ckpt"]  # no temporary file left
    published.write_bytes(b"the real model")
    run_ddp()  # now there is a model: a debug run keeps it
    assert published.read_bytes() == b"the real model"


# ---------------------------------------------------------------------------------------------------
# real entry points (subprocesses; each fails in its checks, before any model is built)


def cli(entry: str, *overrides: str, root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "GRIDVQA_ROOT": str(root), "HF_HUB_OFFLINE": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", f"gridvqa.{entry}", *overrides], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_one_line(proc: subprocess.CompletedProcess, pattern: str) -> None:
    import re

    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert re.match(f"^error: {pattern}", lines[0]), lines[0]


def published_model(root: Path) -> Path:
    published = root / "artifacts" / "train" / "model.ckpt"
    published.parent.mkdir(parents=True)
    published.write_bytes(b"an earlier model")
    return published


def test_cli_train_bad_value(tiny_shapes, tmp_path):
    published = published_model(tmp_path)
    proc = cli("train", f"data_root={tiny_shapes}", "data.batch_size=abc", root=tmp_path)
    assert_one_line(proc, "data.batch_size=abc: expected an integer >= 1")
    assert published.read_bytes() == b"an earlier model"


def test_cli_train_hostile_checkpoint(tiny_shapes, tmp_path):
    published = published_model(tmp_path)
    marker = tmp_path / "PWNED"
    evil = hostile_checkpoint(tmp_path / "evil.ckpt", marker)
    proc = cli("train", f"data_root={tiny_shapes}", f"ckpt_path={evil}", root=tmp_path)
    assert_one_line(proc, rf"{evil}: refused to load this checkpoint to resume from \(ckpt_path\)")
    assert not marker.exists()
    assert published.read_bytes() == b"an earlier model"


def test_cli_extract_and_evaluate(tiny_shapes, tmp_path):
    feats = tmp_path / "grid_val.h5"
    feats.write_bytes(b"features already there")
    proc = cli("extract", f"data_root={tiny_shapes}", f"output={feats}", "dtype=int8", root=tmp_path)
    assert_one_line(proc, "dtype=int8: expected one of float16 | float32")
    bad = unwritable(tmp_path)
    proc = cli("extract", f"data_root={tiny_shapes}", f"output={bad}/grid_val.h5", root=tmp_path)
    assert_one_line(proc, f"output={bad}/grid_val.h5: cannot be written: .*file.txt is a file, not a folder")
    proc = cli("evaluate", f"data_root={tiny_shapes}", f"out={bad}/results.json", root=tmp_path)
    assert_one_line(proc, f"out={bad}/results.json: cannot be written")
    proc = cli("evaluate", f"data_root={tmp_path / 'no_data'}", root=tmp_path)  # the README's form is read
    assert_one_line(proc, f"{tmp_path / 'no_data'}: data root not found")
    assert feats.read_bytes() == b"features already there"
    assert (tmp_path / "file.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------------------------------
# every question of the split is scored, in training's validation as in evaluate


def test_validation_scores_questions_without_image_like_evaluate(tiny_shapes, tmp_path):
    from hydra.utils import instantiate

    from gridvqa.data import layout
    from gridvqa.data.vqa2 import load_split
    from gridvqa.inference import evaluate_split

    root = tmp_path / "data"
    shutil.copytree(tiny_shapes, root)
    entries = load_split(root, "val")
    broken = entries[0].image_id
    layout.coco_image_path(root, "val", broken).write_bytes(b"not a jpeg")
    blind = sum(e.image_id == broken for e in entries)
    cfg = compose_cfg(["data.image_size=[64,64]", "data.num_workers=0", "data.val_batch_size=2",
                       "backbone.freeze_at=0"], root, tmp_path / "run")
    pl.seed_everything(0)
    model, dm = instantiate(cfg.model), instantiate(cfg.data)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.validate(model, datamodule=dm)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert metrics["val/no_image"] == blind > 0
    res = evaluate_split(model, root, "val", out=tmp_path / "results.json")
    assert res.answered_blind == blind and res.num_questions == len(entries)
    assert metrics["val/vqa_acc"] == pytest.approx(res.scores["overall"], abs=0.006)  # official: 2 decimals


def test_evaluate_keeps_the_score_when_the_results_file_cannot_be_written(tiny_shapes, tmp_path, monkeypatch):
    from ckpt_utils import region_checkpoint, write_region_features
    from gridvqa.inference import evaluate_split
    from gridvqa.metrics import vqa_eval

    feats = write_region_features(tiny_shapes, "val", tmp_path / "region_val.h5")
    ckpt, _ = region_checkpoint(tiny_shapes, tmp_path / "region.ckpt")
    with pytest.raises(ConfigError, match="^out=.*file.txt is a file"):  # found before the model loads
        evaluate_split(ckpt, tiny_shapes, "val", out=unwritable(tmp_path) / "r.json", features=feats)

    def disk_full(path, items):  # a disk that fills up while the split is answered
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(vqa_eval, "write_results", disk_full)
    res = evaluate_split(ckpt, tiny_shapes, "val", out=tmp_path / "r.json", features=feats)
    assert res.scores is not None and 0 <= res.scores["overall"] <= 100
    assert res.write_error == f"{tmp_path / 'r.json'}: results file not written (No space left on device)"


def test_evaluate_reads_the_features_where_extraction_writes_them(tiny_shapes, tmp_path):
    from ckpt_utils import region_checkpoint, write_region_features
    from gridvqa.data import layout
    from gridvqa.inference import evaluate_split
    from gridvqa.metrics.vqa_eval import accuracy_path

    root = tmp_path / "data"
    shutil.copytree(tiny_shapes, root)
    ckpt, _ = region_checkpoint(root, tmp_path / "region.ckpt")
    default = layout.features_path(root, "region_h5", "val")
    assert default == root / "features" / "region_val.h5"
    make = r"python -m gridvqa.extract kind=region split=val\)$"
    want = rf"region_val.h5: not found; {ckpt} reads region_h5 features: .*" + make
    with pytest.raises(ConfigError, match=want):
        evaluate_split(ckpt, root, "val", out=tmp_path / "r.json")
    write_region_features(root, "val", default)
    res = evaluate_split(ckpt, root, "val", out=tmp_path / "r.json")
    assert res.accuracy_path == accuracy_path(tmp_path / "r.json") == tmp_path / "r_accuracy.json"
    assert json.loads(res.accuracy_path.read_text()) == res.scores and res.write_error is None




# ---------------------------------------------------------------------------------------------------
# the run folder Hydra makes (paths.log_dir, hydra.run.dir / hydra.sweep.dir) is checked before it is made


@contextmanager
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder nobody can write into: mode 0o555, or for root (whom modes do not stop) immutable."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    immutable = False
    try:
        if os.access(ro, os.W_OK):
            chattr = shutil.which("chattr")
            immutable = bool(chattr) and subprocess.run([chattr, "+i", str(ro)]).returncode == 0
            if not immutable:
                pytest.skip("running as root without chattr +i: no folder here is read-only")
        yield ro
    finally:
        if immutable:
            subprocess.run([shutil.which("chattr"), "-i", str(ro)], check=True)
        ro.chmod(0o755)


def hydra_config(overrides: list[str], root: Path, config_name: str = "train") -> DictConfig:
    """The composed config with its `hydra` node, as Hydra hands it to callbacks before a run."""
    from gridvqa.config import compose_config

    return compose_config(config_name, [f"paths.root_dir={root}", *overrides], return_hydra_config=True)


def test_run_folder_check_names_the_key_and_why(tmp_path):
    from gridvqa.hydra_callbacks import check_output_dir

    bad = unwritable(tmp_path)
    cfg = hydra_config([f"paths.log_dir={bad}"], tmp_path)
    why = f"cannot be written: {tmp_path}/file.txt is a file, not a folder$"
    with pytest.raises(ConfigError, match=f"^paths.log_dir={bad}: {why}"):
        check_output_dir(cfg, "hydra.run.dir")
    with pytest.raises(ConfigError, match=f"^paths.log_dir={bad}: cannot be written"):
        check_output_dir(cfg, "hydra.sweep.dir")  # a sweep's folder is under paths.log_dir too
    cfg = hydra_config([f"hydra.run.dir={bad}/mine"], tmp_path)  # outside paths.log_dir
    with pytest.raises(ConfigError, match=f"^hydra.run.dir={bad}/mine: cannot be written"):
        check_output_dir(cfg, "hydra.run.dir")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "evaluate").write_text("a file where the task's runs go")
    cfg = hydra_config([], tmp_path, config_name="evaluate")
    with pytest.raises(ConfigError, match=f"^hydra.run.dir={tmp_path}/logs/evaluate/runs/[0-9_-]+: cannot be "
                                          f"written: {tmp_path}/logs/evaluate is a file"):
        check_output_dir(cfg, "hydra.run.dir")
    cfg = hydra_config([], tmp_path)
    check_output_dir(cfg, "hydra.run.dir")
    check_output_dir(cfg, "hydra.sweep.dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "logs"]  # checking makes nothing
    assert [p.name for p in (tmp_path / "logs").iterdir()] == ["evaluate"]


def test_cli_unwritable_run_folder(tiny_shapes, tmp_path):
    bad = unwritable(tmp_path)
    why = f"cannot be written: {tmp_path}/file.txt is a file, not a folder"
    proc = cli("train", f"data_root={tiny_shapes}", f"paths.log_dir={bad}", root=tmp_path)
    assert_one_line(proc, f"paths.log_dir={bad}: {why}")
    proc = cli("extract", f"data_root={tiny_shapes}", f"hydra.run.dir={bad}/run", root=tmp_path)
    assert_one_line(proc, f"hydra.run.dir={bad}/run: {why}")
    proc = cli("visualize", "-m", f"data_root={tiny_shapes}", f"hydra.sweep.dir={bad}/sweep", "num=1,2",
               root=tmp_path)
    assert_one_line(proc, f"hydra.sweep.dir={bad}/sweep: {why}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]
    assert (tmp_path / "file.txt").read_text() == "keep me"


def test_cli_read_only_log_dir(tiny_shapes, tmp_path):
    with read_only_folder(tmp_path) as ro:
        proc = cli("evaluate", f"data_root={tiny_shapes}", f"paths.log_dir={ro}/logs", root=tmp_path)
        assert_one_line(proc, f"paths.log_dir={ro}/logs: cannot be written: {ro} is not writable "
                              r"\(permissions or a read-only file system\)")
        assert not list(ro.iterdir())

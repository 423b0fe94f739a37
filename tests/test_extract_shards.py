"""Extraction in several processes (gridvqa.extraction_shards): shard part files, the automatic merge by
shard 0 and merge=only give the file a single process writes (same ids, same skipped list, the same
arrays up to float rounding)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gridvqa.config import REPO_ROOT
from gridvqa.data import layout
from gridvqa.errors import ConfigError, DataError
from gridvqa.extraction import run, skipped_path
from test_extract import data, make_cfg, read_all  # noqa: F401 - the module-scoped data fixture

COMMON = ("kind=grid", "weights=random", "image_size=[64,64]", "batch_size=2", "dtype=float32")


@pytest.fixture()
def folder(data, tmp_path) -> Path:  # noqa: F811
    """Seven images with COCO ids (every shard gets several) and one broken file."""
    out = tmp_path / "imgs"
    out.mkdir()
    for split in ("train", "val"):
        for p in sorted(layout.images_dir(data, split).glob("*.jpg")):
            shutil.copy(p, out / p.name)
    (out / "COCO_val2014_000000000099.jpg").write_bytes(b"not a jpeg")
    return out


def _args(folder: Path, out: Path, *extra: str) -> tuple[str, ...]:
    return (*COMMON, f"images_dir={folder}", *extra)


def _same_files(a: Path, b: Path) -> None:
    fa, fb = read_all(a), read_all(b)
    assert sorted(fa) == sorted(fb) and len(fa) >= 6
    for i in fa:
        # A shard batches other images together than one process does, and a batch of 1 and of 2 can
        # round differently (oneDNN picks kernels by batch size: 6e-6 apart on an AVX-512 Xeon).
        np.testing.assert_allclose(fa[i]["grid"], fb[i]["grid"], rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(fa[i]["image_size"], fb[i]["image_size"])
    skipped = [json.loads(skipped_path(p).read_text())["skipped"] for p in (a, b)]
    assert [[e["image_id"] for e in s] for s in skipped] == [[99], [99]]


def _sharded_cli(root: Path, folder: Path, tmp_path: Path, launch: list[str], env: list[dict]) -> list:
    """`launch` + the extraction arguments, one process per entry of `env`; [((stdout, stderr), rc)]."""
    out = tmp_path / "sharded.h5"
    args = [f"paths.data_root={root}", f"output={out}", "num_workers=0", "progress=false", "res5_dilation=1",
            f"paths.log_dir={tmp_path / 'logs'}", "merge_wait=60", *_args(folder, out)]
    base = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), "OMP_NUM_THREADS": "1"}
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs = [subprocess.Popen([*launch, *args], env={**base, **e}, **pipes) for e in env]
    return [(p.communicate(timeout=600), p.returncode) for p in procs]


@pytest.mark.slow  # two interpreters importing torch and Hydra: about 50 s on 2 busy cores
def test_two_processes_then_the_automatic_merge_equal_one_process(data, folder, tmp_path):  # noqa: F811
    single = tmp_path / "single.h5"
    run(make_cfg(data, single, None, *_args(folder, single)))
    out = tmp_path / "sharded.h5"
    # as torchrun starts them: WORLD_SIZE / RANK in the environment, nothing on the command line
    results = _sharded_cli(data, folder, tmp_path, [sys.executable, "-m", "gridvqa.extract"],
                           [{"WORLD_SIZE": "2", "RANK": "1"}, {"WORLD_SIZE": "2", "RANK": "0"}])
    assert [rc for _, rc in results] == [0, 0], results
    assert "merged 2 part files into" in results[1][0][0], results[1]
    _same_files(single, out)
    assert not list(tmp_path.glob("sharded.shard-*"))  # merged parts removed (keep_shards=false)


def test_merge_only_waits_for_complete_parts_and_keeps_them_on_request(data, folder, tmp_path):  # noqa: F811
    single = tmp_path / "single.h5"
    run(make_cfg(data, single, None, *_args(folder, single)))
    out = tmp_path / "m.h5"

    def cfg(*extra: str):
        return make_cfg(data, out, None, *_args(folder, out), "shards=2", *extra)

    s1 = run(cfg("shard=1", "merge=off"))
    assert s1.path == tmp_path / "m.shard-1-of-2.h5" and s1.done_now >= 3
    with pytest.raises(DataError, match=r"cannot merge: .*m\.shard-0-of-2\.h5 does not exist yet"):
        run(cfg("merge=only"))
    s0 = run(cfg("shard=0", "merge=off"))
    assert s0.done_now + s1.done_now == len(read_all(single)) and not out.exists()
    s = run(cfg("merge=only", "keep_shards=true"))
    assert "merged 2 part files" in s.line() and "parts kept" in s.line()
    _same_files(single, out)
    assert (tmp_path / "m.shard-0-of-2.h5").exists()
    # everything is in the merged file now: a shard has nothing left to do
    assert run(cfg("shard=1", "merge=off")).nothing_to_do
    with pytest.raises(ConfigError, match="shard=2: expected 0 .. 1"):
        run(cfg("shard=2"))


@pytest.mark.slow
def test_torchrun_runs_one_shard_per_process_and_rank_0_merges(data, folder, tmp_path):  # noqa: F811
    single = tmp_path / "single.h5"
    run(make_cfg(data, single, None, *_args(folder, single)))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
              "-m", "gridvqa.extract"]
    [((stdout, stderr), rc)] = _sharded_cli(data, folder, tmp_path, launch, [{}])
    assert rc == 0, stderr
    assert "merged 2 part files into" in stdout, stdout
    # one run folder and log per process, even when both start in the same second
    runs = sorted((tmp_path / "logs").glob("*/runs/*"))
    # the two may start in different seconds, either first: the folders' order says nothing
    assert sorted(r.name.endswith("_rank1") for r in runs) == [False, True], runs
    assert not any(r.name.endswith("_rank0") for r in runs), runs
    assert all(len(list(r.glob("*.log"))) == 1 for r in runs), runs
    _same_files(single, tmp_path / "sharded.h5")

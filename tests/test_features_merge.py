"""merge_feature_files: shard files written by real writers -> the file one writer would have written."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from feature_files import PROV, file_contents, grid_size, make_grid, make_region, write_grid, write_region
from gridvqa.data.features import FeatureWriter, merge_feature_files, open_features
from gridvqa.errors import DataError


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_grid_shards_merge_into_the_single_writer_file(tmp_path):
    a = write_grid(tmp_path / "a.h5", [3, 1, 4])  # finished
    b = write_grid(tmp_path / "b.h5", [15, 9, 2, 6], commit_bytes=100, consolidate=False)  # in parts
    c = write_grid(tmp_path / "c.h5", [4, 5, 8])  # 4 is also in a, same content
    empty = write_grid(tmp_path / "e.h5", [])
    before = {p: _digest(p) for p in (a, b, c, empty)}
    out = merge_feature_files([a, b, empty, c], tmp_path / "out" / "all.h5")
    assert out == tmp_path / "out" / "all.h5"
    reference = write_grid(tmp_path / "ref.h5", [3, 1, 4, 15, 9, 2, 6, 5, 8])
    assert file_contents(out) == file_contents(reference)
    with h5py.File(out, "r") as f:  # the documented finished form
        assert not f["features"].is_virtual and "part_files" not in f
    assert sorted(os.listdir(out.parent)) == ["all.h5"]
    assert {p: _digest(p) for p in before} == before  # the shards are left as they were
    assert sorted(os.listdir(tmp_path)) == ["a.h5", "b.h5", "b.h5.parts", "c.h5", "e.h5", "out", "ref.h5"]

    # running it again is a no-op; the finished file is not touched
    stamp = out.stat().st_mtime_ns
    assert merge_feature_files([a, b, empty, c], out) == out and out.stat().st_mtime_ns == stamp


def test_region_shards_with_attributes(tmp_path):
    a = write_region(tmp_path / "a.h5", range(0, 5), dtype="float32")
    b = write_region(tmp_path / "b.h5", range(5, 9), dtype="float32", commit_bytes=300, consolidate=False)
    out = merge_feature_files([str(a), str(b)], tmp_path / "all.h5")
    reference = write_region(tmp_path / "ref.h5", range(9), dtype="float32")
    assert file_contents(out) == file_contents(reference)
    r = open_features(out)
    assert r.has_attributes and r.dtype == "float32"
    np.testing.assert_array_equal(r.get(7)["attr_labels"], make_region(7)["attr_labels"])


def _one_line(e: pytest.ExceptionInfo, *words: str) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg
    return msg


def test_parts_that_disagree_are_refused_naming_the_file(tmp_path):
    a = write_grid(tmp_path / "a.h5", [1, 2])
    other_ckpt = write_grid(tmp_path / "ckpt.h5", [3], prov=dict(PROV, checkpoint_sha256="ff"))
    f32 = write_grid(tmp_path / "f32.h5", [3], dtype="float32")
    region = write_region(tmp_path / "r.h5", [3])
    with FeatureWriter(tmp_path / "wide.h5", "grid", PROV) as w:
        w.add_grid(3, np.zeros((2, 2, 9), np.float32), (5, 5))
    clash = tmp_path / "clash.h5"
    with FeatureWriter(clash, "grid", PROV) as w:
        w.add_grid(2, make_grid(2) + 1, grid_size(2))
    out = tmp_path / "out.h5"
    with pytest.raises(DataError) as e:
        merge_feature_files([a, other_ckpt], out)
    _one_line(e, str(other_ckpt), "checkpoint_sha256: 'ab12'", "'ff'")
    with pytest.raises(DataError) as e:
        merge_feature_files([a, f32], out)
    _one_line(e, str(f32), "dtype: 'float16'")
    with pytest.raises(DataError) as e:
        merge_feature_files([a, region], out)
    _one_line(e, str(region), "kind: 'grid'")
    with pytest.raises(DataError) as e:
        merge_feature_files([a, tmp_path / "wide.h5"], out)
    _one_line(e, "wide.h5", "features rows")
    with pytest.raises(DataError) as e:
        merge_feature_files([a, clash], out)
    _one_line(e, str(clash), "image 2", str(a), "features differs")
    with pytest.raises(DataError) as e:
        merge_feature_files([a, tmp_path / "nope.h5"], out)
    _one_line(e, "nope.h5: feature file not found")
    assert not out.exists() and not (tmp_path / "out.h5.parts").exists()
    with pytest.raises(DataError, match="also one of its parts"):
        merge_feature_files([a, a], a)
    merge_feature_files([a, tmp_path / "." / "a.h5"], out)  # one part named twice is read once
    assert file_contents(out) == file_contents(a)


def test_existing_output_and_overwrite(tmp_path):
    a = write_grid(tmp_path / "a.h5", [1, 2])
    b = write_grid(tmp_path / "b.h5", [3])
    out = write_grid(tmp_path / "out.h5", [7])
    with pytest.raises(DataError) as e:
        merge_feature_files([a, b], out)
    _one_line(e, str(out), "not a merge of these parts", "overwrite=True")
    merge_feature_files([a, b], out, overwrite=True)
    assert file_contents(out) == file_contents(write_grid(tmp_path / "ref.h5", [1, 2, 3]))
    with pytest.raises(DataError):  # a finished merge of other parts is not this merge either
        merge_feature_files([b, a], out)


def test_a_shard_being_written_is_refused(tmp_path):
    a = write_grid(tmp_path / "a.h5", [1])
    with FeatureWriter(tmp_path / "b.h5", "grid", PROV) as w:
        w.add_grid(2, make_grid(2), grid_size(2))
        with pytest.raises(DataError, match="b.h5: another FeatureWriter"):
            merge_feature_files([a, tmp_path / "b.h5"], tmp_path / "out.h5")


CHILD = """
import sys
sys.path.insert(0, {tests!r})
from gridvqa.data.features import merge_feature_files

merge_feature_files(sys.argv[2:], sys.argv[1], commit_bytes=2000)
print("done", flush=True)
"""


def _committed(path: Path) -> int:
    """Images committed to `path` so far (-1 before it exists)."""
    try:
        with h5py.File(path, "r") as f:
            return len(f["image_ids"])
    except (OSError, KeyError):
        return -1


def test_merge_killed_and_run_again_gives_the_same_file(tmp_path):
    shards = [
        write_grid(tmp_path / "s0.h5", range(0, 150)),  # finished: taken whole
        write_grid(tmp_path / "s1.h5", range(150, 300), commit_bytes=3000, consolidate=False),
        write_grid(tmp_path / "s2.h5", range(290, 400)),  # 290-299 repeat s1's: copied image by image
    ]
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD.format(tests=str(Path(__file__).parent))))
    out = tmp_path / "out" / "all.h5"
    cmd = [sys.executable, str(script), str(out), *map(str, shards)]
    rng = random.Random(3)
    kills, counts = 0, [0]
    for _ in range(6):
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        # kill once this run has committed something: at random points of the copy and the consolidation
        while child.poll() is None and _committed(out) <= counts[-1]:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.03))
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        kills += child.returncode == -signal.SIGKILL
        if child.returncode == 0:
            break
        with open_features(out) as r:  # a killed merge leaves a readable file: a prefix of the merge
            assert r.image_ids == list(range(len(r)))
            counts.append(len(r))
    assert counts == sorted(counts) and len(set(counts)) >= 3, counts  # it got further run after run
    assert kills >= 2
    final = subprocess.run(cmd, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    assert sorted(os.listdir(out.parent)) == ["all.h5"]
    assert file_contents(out) == file_contents(write_grid(tmp_path / "ref.h5", range(400)))
    with h5py.File(out, "r") as f:
        assert json.loads(f.attrs["provenance_json"]) == open_features(shards[0]).provenance

"""The HDF5 feature store: formats, provenance, resume after SIGKILL, readers in DataLoader workers."""

from __future__ import annotations

import json
import os
import pickle
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from feature_files import (
    PROV,
    C,
    check_intact,
    flushed_writer,
    kill_and_resume,
    make_grid,
    make_region,
    write_grid,
)
from gridvqa.data.features import FeatureWriter, GridFeatures, RegionFeatures, open_features
from gridvqa.errors import DataError


def test_grid_shapes_dtypes_and_reader(tmp_path):
    path = write_grid(tmp_path / "g.h5", range(10), commit_bytes=300)
    assert sorted(os.listdir(tmp_path)) == ["g.h5"]  # consolidated: no parts folder, no temp files
    r = open_features(path)
    assert isinstance(r, GridFeatures) and r.path == path
    assert len(r) == 10 and r.image_ids == list(range(10)) and r.feature_dim == C and r.dtype == "float16"
    for i in range(10):
        item = r.get(i)
        g = make_grid(i)
        assert item["grid"].dtype == np.float16 and item["grid"].shape == g.shape
        np.testing.assert_array_equal(item["grid"], g.astype(np.float16))
        assert item["image_size"] == (100 + i, 200 + i) and r.grid_shape(i) == g.shape[:2]
    assert r.max_cells == max(make_grid(i).shape[0] * make_grid(i).shape[1] for i in range(10))
    with pytest.raises(KeyError):
        r.get(99)
    with h5py.File(path, "r") as f:
        assert f["features"].dtype == np.float16 and not f["features"].is_virtual
        assert f["image_ids"].dtype == np.int64 and f["image_size"].dtype == np.int32
        assert f["grid_shape"].shape == (10, 2) and "part_files" not in f


def test_float32_option(tmp_path):
    path = write_grid(tmp_path / "g32.h5", range(3), dtype="float32")
    r = open_features(path)
    assert r.dtype == "float32" and r.provenance["dtype"] == "float32"
    np.testing.assert_array_equal(r.get(2)["grid"], make_grid(2))  # exact: no float16 rounding
    with h5py.File(path, "r") as f:
        assert f["features"].dtype == np.float32 and f.attrs["dtype"] == "float32"


def test_float16_overflow_and_bad_input_are_refused(tmp_path):
    with FeatureWriter(tmp_path / "g.h5", "grid", PROV) as w:
        with pytest.raises(ValueError, match="overflow float16"):
            w.add_grid(1, np.full((2, 2, C), 1e6, np.float32), (10, 10))
        with pytest.raises(ValueError, match=r"grid must be \[H, W, C\]"):
            w.add_grid(1, np.zeros((4, C), np.float32), (10, 10))
        with pytest.raises(ValueError, match="image_size"):
            w.add_grid(1, make_grid(1), (0, 10))
        w.add_grid(1, make_grid(1), (10, 10))
        with pytest.raises(ValueError, match="rows have shape"):
            w.add_grid(2, np.zeros((2, 2, C + 1), np.float32), (10, 10))
        with pytest.raises(ValueError, match="add_region does not apply"):
            w.add_region(3, np.zeros((2, C)), np.zeros((2, 4)), (10, 10))
    assert open_features(tmp_path / "g.h5").image_ids == [1]  # refused images left nothing behind


def test_region_roundtrip_optional_fields(tmp_path):
    path = tmp_path / "r.h5"
    with FeatureWriter(path, "region", {"backbone": "updn"}, commit_bytes=200) as w:
        for i in range(6):
            w.add_region(i, image_size=(50, 60), **make_region(i))
        with pytest.raises(ValueError, match="give it for all or none"):
            w.add_region(7, image_size=(5, 5), **make_region(7, attrs=False))
        d = make_region(8)
        w.add_region(
            8, d["features"], d["boxes"], (5, 5), attr_labels=d["attr_labels"], attr_scores=d["attr_scores"]
        )
    r = open_features(path)
    assert isinstance(r, RegionFeatures) and r.has_attributes and len(r) == 7
    for i in range(6):
        got, want = r.get(i), make_region(i)
        n = len(want["features"])
        assert got["features"].shape == (n, C) and got["features"].dtype == np.float16
        assert got["boxes"].dtype == np.float32 and got["labels"].dtype == np.int32
        np.testing.assert_array_equal(got["boxes"], want["boxes"].astype(np.float32))
        np.testing.assert_array_equal(got["labels"], want["labels"])
        np.testing.assert_array_equal(got["scores"], want["scores"].astype(np.float32))
        np.testing.assert_array_equal(got["attr_labels"], want["attr_labels"])
        assert got["attr_scores"].shape == (n, 3) and got["image_size"] == (50, 60) and r.num_boxes(i) == n
    no_labels = r.get(8)
    assert (no_labels["labels"] == -1).all() and np.isnan(no_labels["scores"]).all()
    assert r.max_boxes == 6

    with FeatureWriter(tmp_path / "r2.h5", "region", {}) as w:  # a file without attributes
        w.add_region(1, image_size=(5, 5), **make_region(1, attrs=False))
    r2 = open_features(tmp_path / "r2.h5")
    assert not r2.has_attributes and "attr_labels" not in r2.get(1)


def test_provenance_attributes(tmp_path):
    path = write_grid(tmp_path / "g.h5", [1])
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] == "gridvqa-features" and f.attrs["kind"] == "grid"
        assert f.attrs["backbone"] == "r50" and f.attrs["checkpoint_sha256"] == "ab12"
        assert json.loads(f.attrs["resize"]) == {"short": 600, "max": 1000}  # non-scalars as JSON text
        assert f.attrs["dtype"] == "float16" and f.attrs["code_version"]
        full = json.loads(f.attrs["provenance_json"])
    assert full == open_features(path).provenance
    assert full["resize"] == PROV["resize"] and full["kind"] == "grid"
    with pytest.raises(ValueError, match="reserved"):
        FeatureWriter(tmp_path / "x.h5", "grid", {"format": "mine"})
    with pytest.raises(ValueError, match="contradicts"):
        FeatureWriter(tmp_path / "x.h5", "grid", {"dtype": "float32"})


def test_provenance_refusal_then_overwrite(tmp_path):
    path = write_grid(tmp_path / "g.h5", range(4))
    new = dict(PROV, checkpoint_sha256="ff99")
    with pytest.raises(DataError) as e:
        FeatureWriter(path, "grid", new, dtype="float32")
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "overwrite=True" in msg
    assert "checkpoint_sha256: 'ab12' in file vs 'ff99' now" in msg and "dtype: 'float16'" in msg
    assert "backbone" not in msg  # only the keys that differ
    assert not (tmp_path / "g.h5.parts").exists()  # a refused writer leaves nothing behind

    w = FeatureWriter(path, "grid", new, dtype="float32", overwrite=True)
    assert w.done_ids == set()
    w.add_grid(10, make_grid(10), (5, 5))
    # Until the first commit the old file is intact and readable.
    assert open_features(path).image_ids == [0, 1, 2, 3]
    w.close()
    r = open_features(path)
    assert r.image_ids == [10] and r.provenance["checkpoint_sha256"] == "ff99" and r.dtype == "float32"
    assert sorted(os.listdir(tmp_path)) == ["g.h5"]


def test_resume_from_finished_file_and_duplicates(tmp_path):
    path = write_grid(tmp_path / "g.h5", range(5))
    with FeatureWriter(path, "grid", PROV) as w:
        assert w.done_ids == set(range(5)) and w.is_complete(range(5))
        assert w.missing(range(7)) == [5, 6] and not w.is_complete(range(7))
        assert w.add_grid(3, np.zeros((1, 1, C)), (5, 5)) is False  # a done id is ignored, not replaced
        for i in (5, 6):
            assert w.add_grid(i, make_grid(i), (100 + i, 200 + i))
        w.flush()
        assert w.pending == 0 and w.add_grid(6, make_grid(6), (1, 1)) is False
    r = open_features(path)
    assert r.image_ids == list(range(7))
    for i in range(7):
        np.testing.assert_array_equal(r.get(i)["grid"], make_grid(i).astype(np.float16))
    assert sorted(os.listdir(tmp_path)) == ["g.h5"]


def test_second_writer_refused(tmp_path):
    with FeatureWriter(tmp_path / "g.h5", "grid", PROV):
        with pytest.raises(DataError, match="another FeatureWriter"):
            FeatureWriter(tmp_path / "g.h5", "grid", PROV)


def test_bad_files_give_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="nope.h5: feature file not found"):
        open_features(tmp_path / "nope.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(DataError, match="text.h5: not a readable HDF5 file"):
        open_features(tmp_path / "text.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(DataError, match="other.h5: not a gridvqa feature file"):
        open_features(tmp_path / "other.h5")
    with pytest.raises(DataError, match="other.h5: not a gridvqa feature file"):
        FeatureWriter(tmp_path / "other.h5", "grid", PROV)
    path = write_grid(tmp_path / "g.h5", range(3))
    with pytest.raises(DataError, match="a grid feature file, expected region"):
        RegionFeatures(path)
    # An unconsolidated file whose part went missing is refused, not read as zeros.
    path = write_grid(tmp_path / "v.h5", range(6), commit_bytes=100, consolidate=False)
    part = sorted((tmp_path / "v.h5.parts").glob("part-*.h5"))[1]
    part.unlink()
    with pytest.raises(DataError, match=rf"v.h5: part file .*{part.name} is missing"):
        open_features(path)


@pytest.mark.parametrize("consolidate", [True, False])
def test_plain_h5py_reading_as_documented(tmp_path, consolidate):
    gpath = write_grid(tmp_path / "g.h5", range(6), commit_bytes=200, consolidate=consolidate)
    rpath = tmp_path / "r.h5"
    with FeatureWriter(rpath, "region", {}, commit_bytes=200, consolidate=consolidate) as w:
        for i in range(6):
            w.add_region(i, image_size=(7, 9), **make_region(i))
    # Exactly the recipe of the module docstring, run from another working directory.
    cwd = os.getcwd()
    os.chdir("/")
    try:
        with h5py.File(gpath, "r") as f:
            assert f["features"].is_virtual is (not consolidate)
            for image_id in (5, 0, 3):
                i = list(f["image_ids"][:]).index(image_id)
                o = int(f["offset"][i])
                h, w = f["grid_shape"][i]
                grid = f["features"][o : o + h * w].reshape(h, w, -1)
                np.testing.assert_array_equal(grid, make_grid(image_id).astype(np.float16))
        with h5py.File(rpath, "r") as f:
            for image_id in (4, 1):
                i = list(f["image_ids"][:]).index(image_id)
                o, n = int(f["offset"][i]), int(f["num_boxes"][i])
                want = make_region(image_id)
                np.testing.assert_array_equal(f["features"][o : o + n], want["features"].astype(np.float16))
                np.testing.assert_array_equal(f["boxes"][o : o + n], want["boxes"].astype(np.float32))
                np.testing.assert_array_equal(f["attr_labels"][o : o + n], want["attr_labels"])
                assert tuple(f["image_size"][i]) == (7, 9)
    finally:
        os.chdir(cwd)


def test_reader_open_during_consolidation_keeps_working(tmp_path):
    path = tmp_path / "g.h5"
    w = flushed_writer(path, 8, commit_bytes=100)
    r = open_features(path)  # sees the unconsolidated form
    np.testing.assert_array_equal(r.get(0)["grid"], make_grid(0).astype(np.float16))
    w.close()  # consolidates and deletes the parts the reader has not opened yet
    assert not (tmp_path / "g.h5.parts").exists()
    for i in range(8):
        np.testing.assert_array_equal(r.get(i)["grid"], make_grid(i).astype(np.float16))


def test_reader_holding_an_old_index_never_reads_newer_data(tmp_path):
    path = tmp_path / "g.h5"
    expect = {i: make_grid(i).astype(np.float16) for i in range(12)}
    # A consolidated file whose data a later writer adopts as a part: the reader must not read that part
    # through the virtual index after the next consolidation removed it (NaN fill values).
    write_grid(path, range(4))
    r = open_features(path)
    w = FeatureWriter(path, "grid", PROV, commit_bytes=100)
    w.add_grid(4, make_grid(4), (104, 204))
    w.flush()
    np.testing.assert_array_equal(r.get(0)["grid"], expect[0])
    w.close()
    for i in range(4):
        np.testing.assert_array_equal(r.get(i)["grid"], expect[i])
    # An unconsolidated index whose part names a later writer would give to other data after consolidating.
    path = tmp_path / "h.h5"
    write_grid(path, range(6), commit_bytes=100, consolidate=False)
    r = open_features(path)
    np.testing.assert_array_equal(r.get(0)["grid"], expect[0])  # opens the first part only
    FeatureWriter(path, "grid", PROV).close()  # consolidates, removes the parts
    with FeatureWriter(path, "grid", PROV, commit_bytes=100, consolidate=False) as w:
        for i in range(6, 12):
            w.add_grid(i, make_grid(i), (100 + i, 200 + i))
    for i in range(6):
        np.testing.assert_array_equal(r.get(i)["grid"], expect[i])
    assert check_intact(path) == set(range(12))


class _ReaderDataset:
    """What a data module does: hold the reader, call get() in whichever process runs __getitem__."""

    def __init__(self, reader: GridFeatures) -> None:
        self.reader = reader
        self.ids = reader.image_ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, k: int) -> dict:
        return {"id": self.ids[k], "grid": self.reader.get(self.ids[k])["grid"], "pid": os.getpid()}


@pytest.mark.parametrize("consolidate", [True, False])
def test_reader_in_dataloader_workers(tmp_path, consolidate):
    from torch.utils.data import DataLoader

    path = write_grid(tmp_path / "g.h5", range(24), commit_bytes=200, consolidate=consolidate)
    reader = open_features(path)
    reader.get(0)  # the parent's handle is open before the workers fork: they must open their own
    ds = _ReaderDataset(reader)
    got = list(DataLoader(ds, batch_size=None, num_workers=2, shuffle=True))
    assert sorted(int(b["id"]) for b in got) == list(range(24))
    assert {int(b["pid"]) for b in got} - {os.getpid()}, "items were not read in worker processes"
    for b in got:
        np.testing.assert_array_equal(b["grid"].numpy(), make_grid(int(b["id"])).astype(np.float16))
    clone = pickle.loads(pickle.dumps(reader))  # spawn-style workers pickle the reader
    np.testing.assert_array_equal(clone.get(7)["grid"], reader.get(7)["grid"])
    reader.close()


CHILD = """
import sys
sys.path.insert(0, {tests!r})
from feature_files import PROV, make_grid
from gridvqa.data.features import FeatureWriter

with FeatureWriter(sys.argv[1], "grid", PROV, commit_bytes=600) as w:
    for i in range(int(sys.argv[2])):
        if w.add_grid(i, make_grid(i), (100 + i, 200 + i)) and w.pending == 0:
            print(len(w.done_ids), flush=True)  # a commit just happened
    w.flush()
    print("closing", flush=True)  # consolidation follows
"""


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    n = 500
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD.format(tests=str(Path(__file__).parent))))
    path = tmp_path / "killed" / "g.h5"
    # five kills in the middle of extraction, the sixth during the final consolidation
    final = kill_and_resume(script, path, n, rounds=6, seed=0, gap=(20, 50), check_running=(1, 3))
    assert final.stdout.split() == ["closing"]  # nothing left to extract
    assert check_intact(path) == set(range(n))

    reference = write_grid(tmp_path / "ref.h5", range(n))
    a, b = open_features(path), open_features(reference)
    assert sorted(a.image_ids) == b.image_ids
    for i in range(n):
        ga, gb = a.get(i), b.get(i)
        assert ga["grid"].dtype == gb["grid"].dtype and np.array_equal(ga["grid"], gb["grid"])
        assert ga["image_size"] == gb["image_size"]


def _part_images(path: Path) -> dict[str, list[int]]:
    """{part file name: ids of the images stored in it}, from the documented datasets."""
    with h5py.File(path, "r") as f:
        names = list(f["part_files"].asstr()[:])
        starts = np.cumsum([0, *f["part_rows"][:]])
        out: dict[str, list[int]] = {n: [] for n in names}
        for image_id, o in zip(f["image_ids"][:], f["offset"][:], strict=True):
            out[names[int(np.searchsorted(starts, o, side="right")) - 1]].append(int(image_id))
    return out


def _damage(part: Path, how: str) -> None:
    if how == "truncated":
        os.truncate(part, part.stat().st_size // 2)
    elif how == "garbage":
        with open(part, "r+b") as f:
            f.write(b"\0" * 64)  # the HDF5 signature and superblock
    elif how == "text":
        part.write_text("not hdf5")
    else:  # a readable HDF5 file with the wrong rows
        part.unlink()
        with h5py.File(part, "w") as f:
            f["features"] = np.zeros((1, C), np.float16)


@pytest.mark.parametrize("how", ["truncated", "garbage", "text", "wrong_rows"])
def test_damaged_part_is_named_by_readers_and_redone_by_writers(tmp_path, caplog, how):
    n = 8
    path = write_grid(tmp_path / "g.h5", range(n), commit_bytes=150, consolidate=False)
    parts = _part_images(path)
    assert len(parts) >= 3
    name, lost = list(parts.items())[1]
    part = tmp_path / "g.h5.parts" / name
    _damage(part, how)

    with pytest.raises(DataError) as e:
        open_features(path)
    msg = str(e.value)
    assert "\n" not in msg and f"part file {part} is damaged" in msg and "extraction again" in msg

    with caplog.at_level("WARNING", logger="gridvqa.data.features"):
        w = FeatureWriter(path, "grid", PROV, commit_bytes=150)
    warned = [r.getMessage() for r in caplog.records if name in r.getMessage()]
    assert len(warned) == 1 and f"its {len(lost)} image(s) are dropped" in warned[0]
    assert w.done_ids == set(range(n)) - set(lost) and w.missing(range(n)) == lost
    # The index was committed without the part: readers work again while the writer runs.
    r = open_features(path)
    assert sorted(r.image_ids) == sorted(set(range(n)) - set(lost))
    for i in r.image_ids:
        np.testing.assert_array_equal(r.get(i)["grid"], make_grid(i).astype(np.float16))
    assert not part.exists()
    for i in w.missing(range(n)):
        assert w.add_grid(i, make_grid(i), (100 + i, 200 + i))
    w.close()
    # the same file as one uninterrupted run
    a, b = open_features(path), open_features(write_grid(tmp_path / "ref.h5", range(n)))
    assert sorted(a.image_ids) == b.image_ids
    for i in range(n):
        ga, gb = a.get(i), b.get(i)
        assert np.array_equal(ga["grid"], gb["grid"]) and ga["image_size"] == gb["image_size"]
    assert sorted(os.listdir(tmp_path)) == ["g.h5", "ref.h5"]


def test_missing_parts(tmp_path, caplog):
    path = write_grid(tmp_path / "g.h5", range(8), commit_bytes=150, consolidate=False)
    parts = _part_images(path)
    name, lost = list(parts.items())[0]
    (tmp_path / "g.h5.parts" / name).unlink()
    with caplog.at_level("WARNING", logger="gridvqa.data.features"):
        with FeatureWriter(path, "grid", PROV) as w:  # one part gone: its images are redone
            assert w.missing(range(8)) == lost
            for i in lost:
                w.add_grid(i, make_grid(i), (100 + i, 200 + i))
    assert any(f"{name} is missing" in r.getMessage() for r in caplog.records)
    check_intact(path)

    # The file moved without its folder: every part is missing. Refused, not silently redone from scratch.
    path = write_grid(tmp_path / "m" / "g.h5", range(8), commit_bytes=150, consolidate=False)
    moved = tmp_path / "moved.h5"
    os.replace(path, moved)
    with pytest.raises(DataError) as e:
        FeatureWriter(moved, "grid", PROV)
    msg = str(e.value)
    assert "\n" not in msg and "move the folder with the file" in msg and "overwrite=True" in msg
    with pytest.raises(DataError, match=r"moved.h5: part file .*part-000000-\w+\.h5 is missing"):
        open_features(moved)


def test_part_damaged_during_the_run_fails_consolidation_in_one_line(tmp_path):
    path = tmp_path / "g.h5"
    w = flushed_writer(path, 8, commit_bytes=150)
    name, lost = list(_part_images(path).items())[1]
    _damage(tmp_path / "g.h5.parts" / name, "truncated")
    with pytest.raises(DataError) as e:
        w.close()
    assert "\n" not in str(e.value) and name in str(e.value)
    assert not list(tmp_path.glob(".g.h5.*.tmp"))
    with FeatureWriter(path, "grid", PROV) as w:  # the next run redoes that part's images
        assert w.missing(range(8)) == lost
        for i in lost:
            w.add_grid(i, make_grid(i), (100 + i, 200 + i))
    assert check_intact(path) == set(range(8))


@pytest.mark.parametrize("consolidate", [True, False])
def test_truncated_index_suggests_overwrite(tmp_path, consolidate):
    path = write_grid(tmp_path / "g.h5", range(6), commit_bytes=150, consolidate=consolidate)
    os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(DataError, match="g.h5: not a readable HDF5 file"):
        open_features(path)
    with pytest.raises(DataError) as e:
        FeatureWriter(path, "grid", PROV)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "truncated" in msg and "pass overwrite=True" in msg
    write_grid(path, range(3), overwrite=True)
    assert check_intact(path) == {0, 1, 2}
    assert sorted(os.listdir(tmp_path)) == ["g.h5"]


def test_foreign_file_is_not_offered_overwrite(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(DataError) as e:
        FeatureWriter(tmp_path / "other.h5", "grid", PROV)
    assert "not a gridvqa feature file" in str(e.value) and "overwrite" not in str(e.value)

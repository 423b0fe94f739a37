"""FeatureWriter(background=True): the same file as a foreground writer, errors raised in the caller,
back-pressure, and resume after SIGKILL giving the file of one uninterrupted run."""

from __future__ import annotations

import textwrap
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from feature_files import (
    PROV,
    check_intact,
    file_contents,
    grid_size,
    kill_and_resume,
    make_grid,
    make_region,
    write_grid,
)
from gridvqa.data.features import FeatureWriter, open_features
from gridvqa.errors import DataError


def _write(path: Path, kind: str, ids, **kw) -> Path:
    """Write `ids` in order; an id seen before must be refused (add_* returns False)."""
    seen = set()
    with FeatureWriter(path, kind, PROV, **kw) as w:
        for i in ids:
            if kind == "grid":
                added = w.add_grid(i, make_grid(i), grid_size(i))
            else:
                added = w.add_region(i, image_size=(50 + i, 60), **make_region(i))
            assert added is (i not in seen)
            seen.add(i)
    return path


@pytest.mark.parametrize("kind", ["grid", "region"])
@pytest.mark.parametrize("consolidate", [True, False])
def test_same_file_as_the_foreground_writer(tmp_path, kind, consolidate):
    ids = [5, 3, 11, 0, 7, 2, 9, 1, 4, 8, 6, 10] * 2  # repeats are ignored in both modes
    kw = dict(commit_images=3, consolidate=consolidate)
    fg = _write(tmp_path / "fg.h5", kind, ids, **kw)
    bg = _write(tmp_path / "bg.h5", kind, ids, background=True, queue_size=2, **kw)
    a, b = file_contents(fg), file_contents(bg)
    if not consolidate:  # part names are random; the commits (rows per part) are the same
        assert a.pop("part_files")[1] == b.pop("part_files")[1] == (4,)  # 12 images, 3 per commit
        assert a["part_rows"] == b["part_rows"]
    assert a == b
    r = open_features(bg)
    assert r.image_ids == list(dict.fromkeys(ids))


def test_commit_rules_and_flush(tmp_path):
    path = tmp_path / "g.h5"
    w = FeatureWriter(path, "grid", PROV, background=True, commit_images=4, queue_size=8)
    for i in range(10):
        w.add_grid(i, make_grid(i), grid_size(i))
    assert w.done_ids == set(range(10))  # queued images count as done at once
    w.flush()
    assert w.pending == 0 and check_intact(path) == set(range(10))
    with h5py.File(path, "r") as f:
        assert f["part_rows"][:].tolist() == [25, 27, 9]  # images 0-3, 4-7 by commit_images, 8-9 by flush
    w.add_grid(10, make_grid(10), grid_size(10))
    w.flush(wait=False)  # only asks; the commit comes soon after
    deadline = time.monotonic() + 30
    while w.pending and time.monotonic() < deadline:
        time.sleep(0.01)
    assert w.pending == 0 and 10 in check_intact(path)
    w.close()
    assert check_intact(path) == set(range(11))

    # commit_seconds: a foreground writer checks it at each add, a background one on time
    with FeatureWriter(tmp_path / "f.h5", "grid", PROV, commit_seconds=0.0) as w:
        w.add_grid(1, make_grid(1), grid_size(1))
        assert w.pending == 0 and check_intact(tmp_path / "f.h5") == {1}
    # committed on time although no image follows
    with FeatureWriter(path, "grid", PROV, background=True, commit_seconds=0.05) as w:
        w.add_grid(20, make_grid(20), grid_size(20))
        deadline = time.monotonic() + 30
        while w.pending and time.monotonic() < deadline:
            time.sleep(0.01)
        assert w.pending == 0 and 20 in check_intact(path)


def test_bad_input_is_refused_in_the_caller(tmp_path):
    with FeatureWriter(tmp_path / "g.h5", "grid", PROV, background=True) as w:
        with pytest.raises(ValueError, match="overflow float16"):
            w.add_grid(1, np.full((2, 2, 8), 1e6, np.float32), (10, 10))
        w.add_grid(1, make_grid(1), grid_size(1))
        with pytest.raises(ValueError, match="rows have shape"):
            w.add_grid(2, np.zeros((2, 2, 9), np.float32), (10, 10))
    assert open_features(tmp_path / "g.h5").image_ids == [1]


def _break_parts_folder(path: Path) -> Path:
    """Put a plain file where the writer keeps its part files: every later commit fails with OSError.
    The folder is moved aside; `_repair` puts it back."""
    parts = path.with_name(path.name + ".parts")
    aside = path.with_name("aside")
    parts.rename(aside)
    parts.write_text("in the way")
    return aside


def _repair(path: Path, aside: Path) -> None:
    parts = path.with_name(path.name + ".parts")
    parts.unlink()
    aside.rename(parts)


def test_an_error_in_the_thread_is_raised_in_the_caller(tmp_path):
    path = tmp_path / "g.h5"
    w = FeatureWriter(path, "grid", PROV, background=True, commit_images=2)
    for i in range(4):
        w.add_grid(i, make_grid(i), grid_size(i))
    w.flush()
    aside = _break_parts_folder(path)
    w.add_grid(4, make_grid(4), grid_size(4))
    with pytest.raises(OSError):
        w.flush()
    with pytest.raises(OSError):  # and again: the writer takes nothing more
        w.add_grid(6, make_grid(6), grid_size(6))
    w.close()  # the caller has seen the error: close only lets go of the file
    _repair(path, aside)
    assert check_intact(path) == {0, 1, 2, 3}  # what was committed before is intact

    # an error the caller has not seen yet is raised by close(), and by a `with` block's end
    path = tmp_path / "h.h5"
    with pytest.raises(OSError):
        with FeatureWriter(path, "grid", PROV, background=True) as w:
            w.add_grid(0, make_grid(0), grid_size(0))
            aside = _break_parts_folder(path)
    _repair(path, aside)
    assert check_intact(path) == set()  # the file as the writer created it


def test_a_caller_blocked_on_a_full_queue_gets_the_error(tmp_path):
    path = tmp_path / "g.h5"
    w = FeatureWriter(path, "grid", PROV, background=True, commit_images=1, queue_size=1)
    aside = _break_parts_folder(path)
    failed = []

    def produce() -> None:
        try:
            for i in range(1000):
                w.add_grid(i, make_grid(i), grid_size(i))
        except OSError as e:
            failed.append(e)

    t = threading.Thread(target=produce)
    t.start()
    t.join(60)
    assert not t.is_alive() and len(failed) == 1
    w.close()
    _repair(path, aside)


def test_back_pressure_bounds_the_uncommitted_images(tmp_path):
    queue_size, commit_images = 2, 1
    with FeatureWriter(
        tmp_path / "g.h5", "grid", PROV, background=True, commit_images=commit_images, queue_size=queue_size
    ) as w:
        most = 0
        for i in range(60):  # every commit writes and fsyncs two files: far slower than an add
            w.add_grid(i, make_grid(i), grid_size(i))
            most = max(most, w.pending)
        # queued + the one the thread holds + those buffered below commit_images
        assert most <= queue_size + commit_images + 1
    assert check_intact(tmp_path / "g.h5") == set(range(60))


CHILD = """
import sys
sys.path.insert(0, {tests!r})
from feature_files import PROV, grid_size, make_grid
from gridvqa.data.features import FeatureWriter

with FeatureWriter(sys.argv[1], "grid", PROV, background=True, queue_size=4, commit_images=7) as w:
    committed = -1
    for i in range(int(sys.argv[2])):
        w.add_grid(i, make_grid(i), grid_size(i))
        now = len(w.done_ids) - w.pending
        if now != committed:
            committed = now
            print(now, flush=True)
    w.flush()
    print("closing", flush=True)  # consolidation follows
"""


def test_resume_after_sigkill_is_bit_identical_to_one_run(tmp_path):
    n = 300
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD.format(tests=str(Path(__file__).parent))))
    path = tmp_path / "killed" / "g.h5"
    # four kills mid-run, the fifth around the final consolidation
    kill_and_resume(script, path, n, rounds=5, seed=1, gap=(15, 40))
    reference = write_grid(tmp_path / "ref.h5", range(n))
    assert file_contents(path) == file_contents(reference)


def test_second_writer_still_refused(tmp_path):
    with FeatureWriter(tmp_path / "g.h5", "grid", PROV, background=True):
        with pytest.raises(DataError, match="another FeatureWriter"):
            FeatureWriter(tmp_path / "g.h5", "grid", PROV, background=True)

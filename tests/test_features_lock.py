"""One writer at a time on a feature file, across real processes: nothing committed is ever lost."""

from __future__ import annotations

import multiprocessing
import os
import random
import time
from pathlib import Path

import numpy as np
import pytest

from gridvqa.data.features import FeatureWriter, open_features
from gridvqa.errors import DataError

PROV = {"backbone": "stress"}
WORKERS = 4
SHARED = 10_000  # ids every worker tries to add: whoever commits one first owns it


def grid(i: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    return rng.standard_normal((1 + i % 2, 2, 4)).astype(np.float32)


def size(i: int) -> tuple[int, int]:
    return 20 + i % 7, 30


def _open(path: str, rng: random.Random) -> FeatureWriter:
    """Half the time wait for the lock, half the time fail at once and try again later."""
    consolidate = rng.random() < 0.5
    if rng.random() < 0.5:
        return FeatureWriter(path, "grid", PROV, commit_bytes=1, consolidate=consolidate, lock_timeout=None)
    while True:
        try:
            return FeatureWriter(path, "grid", PROV, commit_bytes=1 << 20, consolidate=consolidate)
        except DataError as e:
            if "another FeatureWriter" not in str(e) or "\n" in str(e):
                raise
            time.sleep(rng.uniform(0, 0.003))


def stress_worker(path: str, worker: int, seed: int, rounds: int) -> list[int]:
    """Open, add, flush, add, close the same file `rounds` times; returns the ids it committed."""
    rng = random.Random(seed * 100 + worker)
    committed: list[int] = []
    for r in range(rounds):
        w = _open(path, rng)
        try:
            added = []
            for i in (worker * 1000 + r * 10, worker * 1000 + r * 10 + 1, SHARED + r):
                if w.add_grid(i, grid(i), size(i)):
                    added.append(i)
            w.flush()
            committed += added  # flush returned: these survive whatever happens next
            i = worker * 1000 + r * 10 + 2
            last = [i] if w.add_grid(i, grid(i), size(i)) else []
        finally:
            w.close()
        committed += last
    return committed


def stress_reader(path: str, passes: int) -> int:
    """Read the whole file again and again while the writers run: never a wrong value."""
    seen = 0
    for _ in range(passes):
        with open_features(path) as r:
            for i in r.image_ids:
                item = r.get(i)
                np.testing.assert_array_equal(item["grid"], grid(i).astype(np.float16))
                assert item["image_size"] == size(i)
            seen = max(seen, len(r))
    return seen


def check_file(path: Path, committed: set[int]) -> None:
    with open_features(path) as r:
        ids = r.image_ids
        assert len(ids) == len(set(ids))
        assert committed <= set(ids), f"committed images lost: {sorted(committed - set(ids))}"
        for i in ids:
            item = r.get(i)
            np.testing.assert_array_equal(item["grid"], grid(i).astype(np.float16))
            assert item["image_size"] == size(i)
    assert not list(path.parent.glob(f".{path.name}.*.tmp"))  # no temp file left behind
    FeatureWriter(path, "grid", PROV).close()  # a last writer consolidates and tidies up
    assert sorted(os.listdir(path.parent)) == [path.name]


@pytest.fixture(scope="module")
def pool():
    with multiprocessing.get_context("spawn").Pool(WORKERS + 1) as p:
        yield p


def stress(pool, tmp_path: Path, runs: int, rounds: int) -> None:
    for run in range(runs):
        path = tmp_path / f"run{run}" / "g.h5"
        path.parent.mkdir()
        FeatureWriter(path, "grid", PROV).close()  # an empty file for the reader to start with
        reader = pool.apply_async(stress_reader, (str(path), 10))
        jobs = pool.starmap_async(stress_worker, [(str(path), k, run, rounds) for k in range(WORKERS)])
        results = jobs.get(timeout=120)
        reader.get(timeout=120)
        committed = {i for ids in results for i in ids}
        # every worker's own images, and each shared id exactly once
        assert len(committed) == WORKERS * rounds * 3 + rounds
        check_file(path, committed)


def test_concurrent_writers_never_lose_a_committed_image(pool, tmp_path):
    stress(pool, tmp_path, runs=2, rounds=5)


@pytest.mark.slow
def test_concurrent_writers_fifty_runs(pool, tmp_path):
    stress(pool, tmp_path, runs=50, rounds=8)


def test_second_writer_fails_at_once_naming_file_and_holder(tmp_path):
    path = tmp_path / "g.h5"
    with FeatureWriter(path, "grid", PROV) as w:
        w.add_grid(1, grid(1), size(1))
        start = time.monotonic()
        with pytest.raises(DataError) as e:
            FeatureWriter(path, "grid", PROV, lock_timeout=0.2)
        assert time.monotonic() - start >= 0.2  # it waited as long as asked, no longer than needed
        msg = str(e.value)
        assert "\n" not in msg and str(path) in msg and f"pid {os.getpid()}" in msg
    with FeatureWriter(path, "grid", PROV, lock_timeout=0.2) as w:  # free again once closed
        assert w.done_ids == {1}
    assert sorted(os.listdir(tmp_path)) == ["g.h5"]


def test_a_waiting_writer_gets_the_file_after_the_holder_closes(tmp_path):
    """A writer blocked on the lock while the holder removes the lock file and folder must not write
    under the removed lock: it starts over on the new one and sees the holder's images."""
    path = tmp_path / "g.h5"
    ctx = multiprocessing.get_context("spawn")
    holder = FeatureWriter(path, "grid", PROV)
    holder.add_grid(1, grid(1), size(1))
    with ctx.Pool(1) as p:
        waiting = p.apply_async(_wait_and_add, (str(path),))
        time.sleep(1.5)  # the child has started and blocks on the lock
        assert not waiting.ready()
        holder.close()  # consolidates, removes <file>.parts with its lock file
        assert waiting.get(timeout=60) == [1]
    check_file(path, {1, 2})


def _wait_and_add(path: str) -> list[int]:
    with FeatureWriter(path, "grid", PROV, lock_timeout=None) as w:
        before = sorted(w.done_ids)
        w.add_grid(2, grid(2), size(2))
    return before

import json
import os

import pytest

from gridvqa.data.jsonio import atomic_write_json, load_json
from gridvqa.errors import DataError


def test_atomic_write_leaves_no_temp(tmp_path):
    p = atomic_write_json(tmp_path / "a" / "x.json", {"k": [1, 2]})
    assert json.loads(p.read_text()) == {"k": [1, 2]}
    assert os.listdir(p.parent) == ["x.json"]


def test_failed_write_keeps_old_file(tmp_path):
    p = atomic_write_json(tmp_path / "x.json", {"v": 1})
    with pytest.raises(TypeError):
        atomic_write_json(p, {"v": object()})
    assert json.loads(p.read_text()) == {"v": 1} and os.listdir(tmp_path) == ["x.json"]


def test_errors_are_one_line_with_path(tmp_path):
    with pytest.raises(DataError, match=r"missing\.json: stuff not found"):
        load_json(tmp_path / "missing.json", "stuff")
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"\xff\xfe{")
    with pytest.raises(DataError, match="not UTF-8"):
        load_json(bad)


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        p = atomic_write_json(tmp_path / "x.json", {})
    finally:
        os.umask(old)
    assert p.stat().st_mode & 0o777 == 0o644

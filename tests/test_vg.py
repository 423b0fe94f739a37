import json

import numpy as np
import pytest

from gridvqa.data.vg import MAX_ATTRIBUTES, VisualGenome, read_vocab
from gridvqa.errors import DataError


@pytest.fixture
def vg(tmp_path):
    d = tmp_path / "vg"
    d.mkdir()
    (d / "objects_vocab.txt").write_text("circle,disc\nsquare\n")
    (d / "attributes_vocab.txt").write_text("red\nblue\nlarge,big\n")
    (d / "image_data.json").write_text(
        json.dumps(
            [
                {"image_id": 1, "width": 100, "height": 80, "coco_id": 11},
                {"image_id": 2, "width": 50, "height": 50, "coco_id": None},
            ]
        )
    )
    objs = [
        {
            "object_id": 1,
            "x": 10,
            "y": 5,
            "w": 20,
            "h": 30,
            "names": ["Disc"],
            "attributes": ["red", "big", "shiny"],
        },
        {"object_id": 2, "x": 90, "y": 70, "w": 30, "h": 30, "names": ["square"]},
        {"object_id": 3, "x": 0, "y": 0, "w": 5, "h": 5, "names": ["tree"]},
        {"object_id": 4, "x": 5, "y": 5, "w": 0, "h": 5, "names": ["square"]},
    ]
    (d / "attributes.json").write_text(
        json.dumps([{"image_id": 1, "attributes": objs}, {"image_id": 2, "attributes": []}])
    )
    (d / "objects.json").write_text(json.dumps([{"image_id": 1, "objects": objs}]))
    return d


def test_vocab_synonyms(vg):
    names, lookup = read_vocab(vg / "objects_vocab.txt")
    assert names == ["circle", "square"] and lookup["disc"] == 0


def test_records_boxes_labels_attributes(vg):
    ds = VisualGenome(vg)
    assert len(ds) == 1 and ds.num_classes == 2 and ds.num_attributes == 3
    r = ds[0]
    np.testing.assert_allclose(r.boxes, [[10, 5, 30, 35], [90, 70, 100, 80]])  # clipped to the image
    assert r.labels.tolist() == [1, 2]  # 1-based, 0 = background
    assert r.attributes.shape == (2, MAX_ATTRIBUTES)
    assert r.attributes[0, :3].tolist() == [0, 2, -1] and (r.attributes[1] == -1).all()
    assert ds.stats.dropped_unknown_class == 1 and ds.stats.dropped_degenerate == 1
    assert ds.stats.unknown_attributes == 1
    assert ds.image_path(1) == vg / "VG_100K" / "1.jpg"
    ds.exclude_coco_ids({11})
    assert len(ds) == 0


def test_objects_only_and_errors(vg):
    ds = VisualGenome(vg, with_attributes=False)
    assert (ds[0].attributes == -1).all()
    (vg / "attributes.json").write_text(json.dumps([{"image_id": 9, "attributes": []}]))
    with pytest.raises(DataError, match="image_id 9 is not in image_data.json"):
        VisualGenome(vg)
    (vg / "image_data.json").unlink()
    with pytest.raises(DataError, match="image_data.json"):
        VisualGenome(vg)

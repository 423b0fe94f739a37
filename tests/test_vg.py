import json

import numpy as np
import pytest

from gridvqa.data.vg import (
    MAX_ATTRIBUTES,
    VisualGenome,
    clean_attribute,
    clean_object_name,
    clean_string,
    image_folder,
    read_split_file,
    read_vocab,
)
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


# -- bottom-up-attention's name cleaning (data/genome/setup_vg.py) -----------------------------------------
def _write_vg(d, objs, vocab="plate\ntennis racket\nshirt,tee shirt\ncircle\n",
              attrs="white\nwooden\nred\nblue\nblack and white\nshiny\n"):
    d.mkdir(exist_ok=True)
    (d / "objects_vocab.txt").write_text(vocab)
    (d / "attributes_vocab.txt").write_text(attrs)
    (d / "image_data.json").write_text(json.dumps([
        {"image_id": 1, "width": 100, "height": 100, "coco_id": None,
         "url": "https://cs.stanford.edu/people/rak248/VG_100K_2/1.jpg"}]))
    objs = [dict({"object_id": k, "x": 1, "y": 2, "w": 10, "h": 10}, **o) for k, o in enumerate(objs)]
    (d / "attributes.json").write_text(json.dumps([{"image_id": 1, "attributes": objs}]))
    return VisualGenome(d)


def _names(ds, rec):
    attrs = [[ds.attribute_names[a] for a in row if a >= 0] for row in rec.attributes]
    return [ds.classes[k - 1] for k in rec.labels], attrs


def test_object_name_is_the_first_name_cleaned(tmp_path):
    ds = _write_vg(tmp_path / "vg", [
        {"names": ["  Plate. "]},                   # case, spaces, trailing period
        {"names": ["bowl", "plate"]},               # only the first name counts: bowl is unknown
        {"names": ["Tee Shirt"]},                   # synonym of the vocabulary line "shirt,tee shirt"
        {"names": ["tennis racket"]},               # "tennis" is not a common attribute: one name
    ])
    names, _ = _names(ds, ds[0])
    assert names == ["plate", "shirt", "tennis racket"]
    assert ds.stats.dropped_unknown_class == 1


def test_leading_common_attributes_become_attributes(tmp_path):
    ds = _write_vg(tmp_path / "vg", [
        {"names": ["white plate"]},
        {"names": ["White wooden plate."], "attributes": ["shiny"]},
        {"names": ["shiny plate"]},                 # "shiny" is not one of setup_vg's common attributes
        {"names": ["red circle"], "attributes": ["Red"]},  # the same attribute once
    ])
    names, attrs = _names(ds, ds[0])
    assert names == ["plate", "plate", "circle"]
    assert attrs == [["white"], ["white", "wooden", "shiny"], ["red"]]
    assert ds.stats.dropped_unknown_class == 1  # "shiny plate" is not a vocabulary name


def test_attributes_split_on_and_except_black_and_white(tmp_path):
    ds = _write_vg(tmp_path / "vg", [
        {"names": ["circle"], "attributes": ["red and blue", "black and white", " Wooden. "]},
        {"names": ["circle"], "attributes": ["red and purple"]},
    ])
    _, attrs = _names(ds, ds[0])
    assert attrs == [["red", "blue", "black and white", "wooden"], ["red"]]
    assert ds.stats.unknown_attributes == 1  # purple


def test_unit_cleaning_rules():
    assert clean_string(" Plate. ") == "plate" and clean_string("a.b") == "a.b"
    assert clean_object_name("white plate") == ("plate", ["white"])
    assert clean_object_name("large white plate") == ("plate", ["large", "white"])
    assert clean_object_name("white big plate") == ("white big plate", [])
    assert clean_object_name("white") == ("white", [])
    assert clean_attribute("Red and Blue.") == ["red", "blue"]
    assert clean_attribute("black and white") == ["black and white"]


# -- broken coordinates are dropped and counted, never read as boxes ---------------------------------------
def test_nan_and_non_numeric_boxes_are_dropped_and_counted(tmp_path):
    d = tmp_path / "vg"
    d.mkdir()
    objs = [
        {"names": ["circle"], "x": 1, "y": 2, "w": 10, "h": 10},
        {"names": ["circle"], "x": float("nan"), "y": 2, "w": 10, "h": 10},
        {"names": ["circle"], "x": 1, "y": 2, "w": float("inf"), "h": 10},
        {"names": ["circle"], "x": "abc", "y": 2, "w": 10, "h": 10},
        {"names": ["circle"], "x": None, "y": 2, "w": 10, "h": 10},
        {"names": ["circle"], "y": 2, "w": 10, "h": 10},
        {"names": ["circle"], "x": "3", "y": 2, "w": 10, "h": 10},  # a numeric string is a number
    ]
    (d / "objects_vocab.txt").write_text("circle\n")
    (d / "attributes_vocab.txt").write_text("red\n")
    (d / "image_data.json").write_text(json.dumps([{"image_id": 1, "width": 50, "height": 50}]))
    # json.dumps writes NaN / Infinity, which Python's json reads back: what a damaged file can hold
    (d / "attributes.json").write_text(json.dumps([{"image_id": 1, "attributes": objs}]))
    ds = VisualGenome(d)
    assert ds[0].boxes.tolist() == [[1, 2, 11, 12], [3, 2, 13, 12]]
    assert np.isfinite(ds[0].boxes).all()
    assert ds.stats.dropped_bad_coordinates == 5 and ds.stats.boxes == 2
    lines = ds.stats.summary_lines()
    assert "Visual Genome: 5 boxes dropped: a coordinate missing or not a finite number" in lines
    assert not any("vocabulary" in line for line in lines)  # zero counts are not listed


# -- split files and image folders --------------------------------------------------------------------------
def test_split_files_in_bottom_up_format_or_plain_ids(tmp_path):
    f = tmp_path / "train.txt"
    f.write_text("VG_100K_2/2415417.jpg xml/2415417.xml\nVG_100K/170.jpg xml/170.xml\n\n")
    assert read_split_file(f) == [2415417, 170]
    f.write_text("12\n 13 \n")
    assert read_split_file(f) == [12, 13]
    f.write_text("12\nVG_100K/abc.jpg xml/abc.xml\n")
    with pytest.raises(DataError, match=r"train.txt: line 2 .*neither an image id"):
        read_split_file(f)
    with pytest.raises(DataError, match="split file not found"):
        read_split_file(tmp_path / "missing.txt")


def test_image_path_follows_the_url_folder(tmp_path):
    ds = _write_vg(tmp_path / "vg", [{"names": ["circle"]}])
    assert ds.image_path(1) == tmp_path / "vg" / "VG_100K_2" / "1.jpg"  # the url says so (no file yet)
    (tmp_path / "vg" / "VG_100K").mkdir()
    (tmp_path / "vg" / "VG_100K" / "1.jpg").write_bytes(b"x")
    assert ds.image_path(1) == tmp_path / "vg" / "VG_100K" / "1.jpg"  # where the file actually is
    assert image_folder("https://x/VG_100K/5.jpg") == "VG_100K" and image_folder("5.jpg") is None


def test_keep_image_ids_and_exclusion_are_counted(vg):
    ds = VisualGenome(vg)
    ds.keep_image_ids({2})
    assert len(ds) == 0 and ds.stats.images_not_in_split == 1
    ds = VisualGenome(vg)
    ds.exclude_coco_ids({11})
    assert ds.stats.images_excluded == 1 and ds.stats.images == 0 and ds.stats.boxes == 0
    assert ds.stats.images_without_boxes == 1  # image 2 has no object

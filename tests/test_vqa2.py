import json

import pytest

from gridvqa.data import layout
from gridvqa.data.prepare import main as prepare_main
from gridvqa.data.prepare import prepare
from gridvqa.data.text import load_tokenizer
from gridvqa.data.vqa2 import AnswerVocab, load_entries, load_split, load_splits, soft_score, split_names
from gridvqa.errors import DataError
from vqa_files import write_split

TEN = lambda *xs: [x for x, n in xs for _ in range(n)]  # noqa: E731


@pytest.fixture
def root(tmp_path):
    items = []
    for k in range(12):
        items.append(
            (k * 10 + 1, k, "What color is the circle?", TEN(("Red", 6), ("red.", 2), ("blue", 2)), "other")
        )
        items.append((k * 10 + 2, k, "How many squares?", TEN(("two", 3), ("2", 3), ("3", 4)), "number"))
    items.append((999, 50, "Is it rare?", TEN(("maybe", 10)), "yes/no"))
    write_split(tmp_path, "train", items)
    write_split(tmp_path, "val", items[:4])
    write_split(tmp_path, "test", [(5, 7, "What is it?", [], "")])
    return tmp_path


def test_soft_scores():
    assert [soft_score(c) for c in range(7)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0, 1.0]


def test_load_split_joins_answers(root):
    train = load_split(root, "train")
    assert len(train) == 25
    e = train[0]
    assert e.question_id == 1 and e.image_id == 0 and len(e.answers) == 10
    assert e.answer_type == "other" and e.question_type == "what color is"
    assert e.normalized_answers.count("red") == 8
    test = load_split(root, "test")
    assert test[0].answers == [] and test[0].question == "What is it?"


def test_vocab_min_count_normalised_and_targets(root, tmp_path):
    vocab = AnswerVocab.build(load_split(root, "train"), min_count=9)
    # "Red"/"red." normalise to "red" (12 questions); "two" -> "2" (12); "maybe" appears once -> dropped.
    assert vocab.answers == ["2", "red"]
    targets = vocab.targets(TEN(("two", 3), ("2", 3), ("3", 4)))
    assert targets == {vocab.index["2"]: 1.0}
    assert vocab.targets(TEN(("red", 1), ("blue", 9))) == {vocab.index["red"]: 0.3}
    p = vocab.save(tmp_path / "answers.json")
    again = AnswerVocab.load(p)
    assert again.answers == vocab.answers and again.min_count == 9
    assert 0 < vocab.coverage(load_split(root, "val")) < 1


def test_missing_split_file_names_path(root):
    with pytest.raises(DataError) as ei:
        load_split(root, "val2014" if False else "test-dev")
    msg = str(ei.value)
    assert str(layout.questions_path(root, "test-dev")) in msg and "not found" in msg
    assert "\n" not in msg


def test_malformed_json_names_line_and_column(root):
    p = layout.questions_path(root, "val")
    p.write_text('{"questions": [\n  {"image_id": 1,, }\n]}')
    with pytest.raises(DataError) as ei:
        load_split(root, "val", with_answers=False)
    assert f"{p}: malformed json at line 2, column" in str(ei.value)


def test_wrong_schema_and_missing_annotation(root):
    qp = layout.questions_path(root, "val")
    qp.write_text(json.dumps({"annotations": []}))
    with pytest.raises(DataError, match="not a VQA questions file"):
        load_split(root, "val", with_answers=False)
    write_split(root, "val", [(1, 0, "q?", TEN(("a", 10)), "other")])
    qp.write_text(json.dumps({"questions": [{"image_id": 0, "question": "q?", "question_id": 77}]}))
    with pytest.raises(DataError, match="have no annotation"):
        load_entries(qp, layout.annotations_path(root, "val"))


def test_prepare_cli_builds_vocab_and_tokenizer(root, capsys):
    assert prepare_main([str(root)]) == 0
    assert AnswerVocab.load(layout.answers_path(root)).answers == ["2", "red"]
    assert (layout.tokenizer_dir(root) / "tokenizer.json").is_file()
    assert prepare_main([str(root)]) == 0
    assert "kept" in capsys.readouterr().out
    assert prepare_main([str(root / "nowhere")]) == 1


# -- the VQA v2 recipe: answers from train + val, words from every question file ----------------


def test_prepare_defaults_count_train_and_val_answers_and_every_question_file(root):
    # "maybe" is seen once in train: 8 more in val make 9, the standard list's threshold (count > 8).
    val = [(2000 + k, 60 + k, "Is it uncommon?", TEN(("maybe", 10)), "yes/no") for k in range(8)]
    write_split(root, "val", val)
    write_split(root, "test-dev", [(7, 8, "Which zebra?", [], "")])
    layout.questions_path(root, "vg").write_text(json.dumps(
        {"questions": [{"image_id": 60, "question": "Where is the giraffe?", "question_id": 9000}]}))
    report = prepare(root)
    assert AnswerVocab.load(layout.answers_path(root)).answers == ["2", "red", "maybe"]
    assert "from train+val" in report["answers"]
    assert "questions of train+val+test+test-dev+vg" in report["tokenizer"]
    words = load_tokenizer(layout.tokenizer_dir(root)).get_vocab()
    assert {"uncommon", "what", "zebra", "giraffe"} <= words.keys()  # val, test, test-dev, VG-QA words

    prepare(root, answer_splits=["train"], force=True, question_splits=["train"])
    assert AnswerVocab.load(layout.answers_path(root)).answers == ["2", "red"]
    assert not {"uncommon", "zebra"} & load_tokenizer(layout.tokenizer_dir(root)).get_vocab().keys()


def test_prepare_without_val_annotations_uses_train(root):
    layout.annotations_path(root, "val").unlink()
    report = prepare(root)
    assert "from train)" in report["answers"]


def test_split_lists(root):
    assert split_names("train") == ("train",)
    assert split_names("train+val") == split_names(["train", "val"]) == ("train", "val")
    bad = ((["train", "train2014"], "twice"), (["train", "vall"], "unknown split 'vall'"), ([], "no split"))
    for splits, why in bad:
        with pytest.raises(DataError, match=why):
            split_names(splits)
    write_split(root, "val", [(5000 + k, 70 + k, "Again?", TEN(("yes", 10)), "yes/no") for k in range(3)])
    both = load_splits(root, ["train", "val"])
    assert len(both) == 25 + 3 and [e.split for e in both] == ["train"] * 25 + ["val"] * 3
    write_split(root, "val", [(1, 0, "Again?", TEN(("yes", 10)), "yes/no")])  # qid 1 is a train question
    with pytest.raises(DataError, match="question 1 is also in split 'train': the splits overlap"):
        load_splits(root, ["train", "val"])


def test_vg_qa_layout_finds_the_coco_folder(tmp_path):
    assert layout.questions_path(tmp_path, "vg") == tmp_path / "vqa" / "VG_questions.json"
    assert layout.annotations_path(tmp_path, "vg") == tmp_path / "vqa" / "VG_annotations.json"
    val_image = tmp_path / "images" / "val2014" / "COCO_val2014_000000000042.jpg"
    val_image.parent.mkdir(parents=True)
    val_image.write_bytes(b"")
    assert layout.coco_image_path(tmp_path, "vg", 42) == val_image
    assert layout.coco_image_path(tmp_path, "vg", 7).parent.name == "train2014"
    assert layout.coco_image_path(tmp_path, "test-dev", 7).parent.name == "test2015"


# -- answers.json is checked, never coerced --------------------------------------------------------


@pytest.mark.parametrize("answers, why", [
    ([1, None, "no"], r"answer #0 is 1 \(int\); every answer must be a non-empty string"),
    (["yes", None], r"answer #1 is None \(NoneType\)"),
    (["yes", ""], "answer #1 is an empty string"),
    (["yes", "no", "yes"], "answer #2 'yes' repeats answer #0; answers must be unique"),
])
def test_answers_json_refuses_non_strings_and_duplicates(tmp_path, answers, why):
    p = tmp_path / "answers.json"
    p.write_text(json.dumps({"answers": answers, "min_count": 9}))
    with pytest.raises(DataError, match=why) as ei:
        AnswerVocab.load(p)
    assert str(ei.value).startswith(f"{p}: ") and "\n" not in str(ei.value)

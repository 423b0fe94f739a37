"""Where files live under a data root: the official VQA v2 / COCO / Visual Genome names.

Pointing `data_root` at a real download laid out the same way is the only change needed to go
from the built-in synthetic set to real data.

    DATA_ROOT/
      vqa/v2_OpenEnded_mscoco_{split}_questions.json     # train2014, val2014, test2015 (test-dev too)
      vqa/v2_mscoco_{split}_annotations.json             # train2014, val2014
      vqa/VG_questions.json  vqa/VG_annotations.json     # optional VG-QA in VQA format (mcan-vqa's files)
      images/{split}/COCO_{split}_{image_id:012d}.jpg    # COCO images (test2015 for the test split)
      vg/image_data.json  vg/objects.json  vg/attributes.json
      vg/objects_vocab.txt  vg/attributes_vocab.txt      # one class per line, synonyms comma-separated
      vg/VG_100K/{image_id}.jpg  (and vg/VG_100K_2/)     # Visual Genome images
      answers.json                                       # answer vocabulary (made by gridvqa)
      tokenizer/                                         # question tokenizer (made by gridvqa)
      stats.json                                         # synthetic set only: blind priors
"""

from __future__ import annotations

from pathlib import Path

# Short split names used in configs -> official COCO/VQA split folder names.
SPLIT_ALIASES: dict[str, str] = {
    "train": "train2014",
    "val": "val2014",
    "test": "test2015",
    "test-dev": "test-dev2015",
    "train2014": "train2014",
    "val2014": "val2014",
    "test2015": "test2015",
    "test-dev2015": "test-dev2015",
    "vg": "vg",
}
# Every question file that feeds the question vocabulary (mcan-vqa core/data/load_data.py tokenises
# train + val + test + vg questions); test-dev is a subset of test2015 but may come alone.
QUESTION_SPLITS: tuple[str, ...] = ("train", "val", "test", "test-dev", "vg")
# VG-QA (mcan-vqa's VG_questions.json) asks about the Visual Genome images that are also in COCO, under
# their COCO ids: their pixels are COCO train2014 / val2014 files.
VG_QA = "vg"
_VG_QA_IMAGE_SPLITS = ("train2014", "val2014")


def official_split(split: str) -> str:
    """Map `train`/`val`/`test`/`test-dev` (or an official name) to the official split name."""
    try:
        return SPLIT_ALIASES[split]
    except KeyError:
        known = ", ".join(sorted(SPLIT_ALIASES))
        raise ValueError(f"unknown split {split!r}; expected one of: {known}") from None


def image_folder_splits(split: str) -> tuple[str, ...]:
    """The COCO image folders a split's images live in: test-dev uses test2015; VG-QA train2014/val2014."""
    s = official_split(split)
    if s == VG_QA:
        return _VG_QA_IMAGE_SPLITS
    return ("test2015",) if s.startswith("test") else (s,)


def image_folder_split(split: str) -> str:
    """The (first) COCO image folder of a split; see `image_folder_splits`."""
    return image_folder_splits(split)[0]


def questions_path(root: str | Path, split: str) -> Path:
    s = official_split(split)
    if s == VG_QA:
        return Path(root) / "vqa" / "VG_questions.json"
    return Path(root) / "vqa" / f"v2_OpenEnded_mscoco_{s}_questions.json"


def annotations_path(root: str | Path, split: str) -> Path:
    s = official_split(split)
    if s == VG_QA:
        return Path(root) / "vqa" / "VG_annotations.json"
    return Path(root) / "vqa" / f"v2_mscoco_{s}_annotations.json"


def images_dir(root: str | Path, split: str) -> Path:
    return Path(root) / "images" / image_folder_split(split)


def coco_image_name(split: str, image_id: int) -> str:
    s = image_folder_split(split)
    return f"COCO_{s}_{int(image_id):012d}.jpg"


def coco_image_path(root: str | Path, split: str, image_id: int) -> Path:
    """The image file of `image_id`; for VG-QA the COCO folder that holds it (else the first candidate)."""
    folders = image_folder_splits(split)
    candidates = [Path(root) / "images" / f / f"COCO_{f}_{int(image_id):012d}.jpg" for f in folders]
    if len(candidates) > 1:
        for c in candidates:
            if c.exists():
                return c
    return candidates[0]


def vg_dir(root: str | Path) -> Path:
    return Path(root) / "vg"


VG_IMAGE_DIRS = ("VG_100K", "VG_100K_2")


def vg_image_path(root: str | Path, image_id: int) -> Path:
    """Real VG spreads images over VG_100K and VG_100K_2; return the one that exists (else the first)."""
    base = vg_dir(root)
    candidates = [base / d / f"{int(image_id)}.jpg" for d in VG_IMAGE_DIRS]
    for c in candidates:
        if c.exists():
            return c
    return candidates[0]


def answers_path(root: str | Path) -> Path:
    return Path(root) / "answers.json"


# the HDF5 feature kind each feature-reading VQA source reads
FEATURE_KINDS = {"grid_h5": "grid", "region_h5": "region"}


def features_path(root: str | Path, kind: str, split: str) -> Path:
    """Where `python -m gridvqa.extract kind=KIND split=SPLIT` writes by default (conf/extract.yaml's
    `output`), and where the experiments reading features look."""
    return Path(root) / "features" / f"{FEATURE_KINDS.get(kind, kind)}_{split}.h5"


def split_features(given: str | Path | None, root: str | Path | None, source: str, split: str | None,
                   owner: str | Path) -> Path:
    """The feature file a model reading `source` features (`owner`, its checkpoint) uses for `split`:
    `given` (features=PATH), else where extraction writes the split's features by default."""
    from gridvqa.errors import ConfigError

    if given:
        return Path(given)
    if root is None or split is None:
        raise ConfigError(f"{owner}: this checkpoint reads {source} features; give the split's feature file "
                          "(features=PATH)")
    path = features_path(root, source, split)
    if not path.is_file():
        kind = FEATURE_KINDS.get(source, source)
        make = f"python -m gridvqa.extract kind={kind} split={split}"
        raise ConfigError(f"{path}: not found; {owner} reads {source} features: give the split's feature "
                          f"file (features=PATH) or make it ({make})")
    return path


def tokenizer_dir(root: str | Path) -> Path:
    return Path(root) / "tokenizer"


def stats_path(root: str | Path) -> Path:
    return Path(root) / "stats.json"

"""HDF5 feature store: grid and region features extracted once per split, read by the VQA data modules.

File format (``format = "gridvqa-features"``, ``format_version = 1``)
--------------------------------------------------------------------
One HDF5 file per split and kind. Images are stored in the order they were written (not sorted by id).

Root attributes:
  format          "gridvqa-features"
  format_version  1
  kind            "grid" | "region"
  dtype           "float16" | "float32"  -- the dtype of ``features``
  feature_dim     C, the channel count (0 while the file holds no image)
  code_version    gridvqa version that wrote the file
  provenance_json JSON object with the whole provenance: every key the extractor passed (backbone,
                  checkpoint hash, resize rule, ...) plus kind, dtype and code_version
  <key>           each provenance key also as its own attribute: str / int / float / bool as is,
                  any other value (list, dict, None) as JSON text

Per-image datasets (N images; entry i describes image i):
  image_ids   int64 [N]     image id (unique)
  image_size  int32 [N, 2]  (height, width) of the original image in pixels
  offset      int64 [N]     first row of the image in the per-row datasets below
  grid_shape  int32 [N, 2]  grid files only: (H, W); the image owns rows offset .. offset + H*W,
                            row-major (cell (y, x) is row offset + y*W + x)
  num_boxes   int32 [N]     region files only: the image owns rows offset .. offset + num_boxes

Per-row datasets (R rows in all: grid cells or boxes):
  features     <dtype> [R, C]  res5 vector of a grid cell / pooled vector of a box
  boxes        float32 [R, 4]  region only: x1, y1, x2, y2 in original-image pixels
  labels       int32 [R]       region only: predicted object class (-1 where the extractor gave none)
  scores       float32 [R]     region only: its score (NaN where the extractor gave none)
  attr_labels  int32 [R, ...]  region only, present only if the extractor gave attributes
  attr_scores  float32 [R, ...]  (same; trailing shape fixed per file, e.g. [R] or [R, K])

Two physical forms with the same names and meaning; h5py hides the difference:
  finished (consolidated) -- every dataset is an ordinary contiguous dataset in this one file;
  in progress / interrupted -- the per-row datasets are HDF5 *virtual* datasets whose pieces are
  immutable files ``<file>.parts/part-NNNNNN-<random>.h5`` beside the file (relative paths: move the folder
  with the file; a name is never reused, so a reader holding an older index cannot read another part);
  datasets ``part_files`` (str [P]) and ``part_rows`` (int64 [P]) list them in row order.

Reading one image with plain h5py:
  with h5py.File(path, "r") as f:
      i = list(f["image_ids"][:]).index(image_id)
      o = int(f["offset"][i])
      h, w = f["grid_shape"][i]                          # grid file
      grid = f["features"][o:o + h * w].reshape(h, w, -1)
      n = int(f["num_boxes"][i])                         # region file
      feats, boxes = f["features"][o:o + n], f["boxes"][o:o + n]

Crash safety (why not SWMR): an HDF5 file is never modified in place. Buffered images are written as a new
part file (temp name, fsync, rename), then a small index file naming all parts replaces ``<file>``
atomically. A process killed at any moment (SIGKILL) leaves either the previous or the next index, both
complete: finished images are intact and half-written ones are invisible. A writer opened on the same
path resumes (``done_ids``) and removes leftovers (``.<file>.*.tmp``, unreferenced parts). ``close()``
consolidates parts into one plain file (temp + rename again), then deletes them: a plain-h5py reader that
opened the file before must open it again (our readers do that by themselves). HDF5's own SWMR mode was
tried and rejected: after a SIGKILL the file cannot be reopened for writing (its status flags need the
h5clear tool) and plain ``"r"`` opens fail.

Damaged parts (a disk error, a partial copy): readers and writers open every part file when they open
the feature file. A reader refuses the file with one line naming the part; a writer logs a warning naming
it and drops its images from the index, so a resumed extraction extracts them again.

Writing off the caller's thread: ``FeatureWriter(..., background=True)`` checks each image in the caller's
thread and leaves the HDF5 writes and commits to one writer thread (same file, same commits, same crash
safety; an error in the thread is raised at the caller's next call).

Shards: ``merge_feature_files(parts, out)`` merges files of one kind, dtype and provenance (one per
extraction process) into one finished file, through the same commit protocol (a killed merge resumes).

One writer at a time: a writer holds an exclusive ``flock`` on ``<file>.parts/writer.lock`` from its
constructor to ``close()``; a second writer fails at once with one line naming the file and the holder's
pid (or waits, with ``lock_timeout``). Two extractions of one file would only compute the same images twice,
so failing is what a user wants by default. The last writer removes the lock file and the folder while
still holding the lock; a writer that wins the lock therefore checks that its lock file is still the one
at that path (same inode) and starts over otherwise, so a lock on a removed file never counts. POSIX
only (fcntl): elsewhere a writer refuses to start.

Modules: ``format`` (names, constants, the index and how it is written), ``index`` (reading and checking
a file), ``lock`` (the writer lock), ``store`` (parts and commits), ``background`` (the writer thread),
``writer`` (FeatureWriter), ``reader`` (the readers), ``merge`` (merge_feature_files).
"""

from gridvqa.data.features.format import DTYPES, FORMAT, FORMAT_VERSION, KINDS
from gridvqa.data.features.merge import merge_feature_files
from gridvqa.data.features.reader import GridFeatures, RegionFeatures, open_features
from gridvqa.data.features.writer import FeatureWriter

__all__ = [
    "DTYPES",
    "FORMAT",
    "FORMAT_VERSION",
    "KINDS",
    "FeatureWriter",
    "GridFeatures",
    "RegionFeatures",
    "merge_feature_files",
    "open_features",
]

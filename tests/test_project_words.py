"""The project speaks of itself only: its user-facing text names no development history.

Greps the README, docs/, conf/, src/, scripts/, notebooks/ and results/ (text files) for the words of a
work diary (numbered work rounds, tracker references, superseded defaults, paths outside the
repository) and keeps the README a guide of at most 300 lines. Legitimate uses of the same words are not
matched: Hydra's `task_name`, a SLURM task, a wandb session, `make reproduce`'s steps.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = [
    "README.md", "Makefile", "pyproject.toml", "docs", "conf", "src", "scripts", "notebooks", "results",
]
TEXT_SUFFIXES = {".md", ".py", ".yaml", ".yml", ".json", ".csv", ".txt", ".ipynb", ".toml", ".cfg", ""}
SKIP_PARTS = {"__pycache__", ".ipynb_checkpoints"}
README_MAX_LINES = 300

# (name, pattern): each pattern is matched case-insensitively against every line
HISTORY = [
    ("numbered work round", r"(?<![a-z])sessions?[\s_-]*#?\d"),
    ("a work round named", r"\b(this|that|first|previous|last|next|earlier|later|GPU|CPU) session('s)?\b"),
    ("tracker reference", r"\b(issues?|tickets?|tasks?)[\s_-]*#\d|\b(issues?|tickets?)\s+\d"),
    ("an issue named", r"\b(the|this|that|its|an?)\s+([\w-]+\s+){0,3}issue('s)?\b"),
    ("a development task", r"\b(this|the|my|our|your)\s+task\s+(asks|says|wants|requires)\b|\btask\s+\d"),
    ("superseded figures", r"\bsuperseded\b"),
    ("an earlier default", r"\b(previous|old|earlier|former|first)\s+(defaults?|recipe|settings)\b"),
    # "a process that no longer runs" says what a stale file is, not what changed
    ("change history", r"\b(has|have) since (moved|changed|become)\b"
                       r"|\bno longer\b(?!\s+(runs?|running|exists?)\b)|\bfollow-up\b"),
    ("a change told", r"\bpreviously\b|\bnow uses\b|\b(was|were) changed\b|\bused to (be|use|run)\b"
                      r"|\bwe (added|changed|moved|replaced|removed)\b"),
    ("path outside the repository", r"/work/(shared|exp)\b|/tmp/gv\b|(?-i:\bDESIGN\.md\b)"),
    ("who built it", r"\b(coordinator|helper session|the agent|the brief)\b"),
]
COMPILED = [(name, re.compile(p, re.IGNORECASE)) for name, p in HISTORY]
# another project's tracker (e.g. "MILVLG/mcan-vqa issue #28", a GitHub link) is a reference, not history
UPSTREAM = re.compile(r"[\w.-]+/[\w.-]+\s+(issues?|pulls?|PR)\s*#?\d+|https?://\S+", re.IGNORECASE)


def _files() -> list[Path]:
    out = []
    for name in SCANNED:
        path = ROOT / name
        if path.is_file():
            out.append(path)
        elif path.is_dir():
            for f in sorted(path.rglob("*")):
                parts = set(f.parts)
                if not f.is_file() or SKIP_PARTS & parts or any(p.endswith(".egg-info") for p in parts):
                    continue
                if f.suffix.lower() in TEXT_SUFFIXES:
                    out.append(f)
    return out


def history_words(text: str) -> list[tuple[int, str, str]]:
    """(line number, what, the line) for each line that reads like a work diary."""
    hits = []
    for n, line in enumerate(text.splitlines(), 1):
        line = UPSTREAM.sub(" ", line)
        for name, rx in COMPILED:
            if rx.search(line):
                hits.append((n, name, line.strip()[:160]))
    return hits


def test_patterns_catch_the_diary_and_spare_the_product():
    diary = [
        "Current defaults (session 6: VG pre-training at side 112)",
        "the session-4 checkpoint attended to the same triangle",
        "made with commit abc in the first session's run",
        "Goals (issue 5): a <= 1.15 x (b + c)",
        "e2e is 37.2 points over the blind prior (the issue asks for 25)",
        "see the VQA training issue's notes",
        "Rerunning at the new defaults is the VQA issue's follow-up.",
        "The loader no longer saves its position.",
        "Extraction now uses the device for the cast; previously it ran on the host.",
        "The default was changed to 128 px.",
        "results/cpu/bench_train_e2e_session6.json",
        "Shorter side 160 / 4 epochs (the previous default) gave AP50 0.15",
        "The first figures were 4x slower throughout and are superseded.",
        "Conventions (see /work/shared/DESIGN.md): BGR 0-255",
    ]
    product = [
        "task_name: e2e",
        "runs go to logs/<task_name>/runs/<time>/",
        "One task per GPU: srun starts every process",
        "#SBATCH --nodes=2 --ntasks-per-node=4 --cpus-per-task=8",
        "wandb runs offline; a wandb session is never opened at run time",
        "a known limitation of the plugin (optuna 2.x)",
        "train frozen_random (3 seeds) | 6.1",
        "the training step as Lightning runs it",
        "overrides.task holds the job's overrides",
        "seen on EvalAI in MILVLG/mcan-vqa issue #28",
        "see docs/design.md and docs/results.md",
        "removes temporary files left by a process that no longer runs",
    ]
    for line in diary:
        assert history_words(line), line
    for line in product:
        assert not history_words(line), line


def test_files_are_scanned():
    files = {f.relative_to(ROOT).as_posix() for f in _files()}
    assert "README.md" in files and "conf/train.yaml" in files and "src/gridvqa/train.py" in files
    assert any(f.startswith("docs/") for f in files) and any(f.startswith("results/") for f in files)


@pytest.mark.parametrize("name", SCANNED)
def test_no_development_history(name):
    found = []
    for f in _files():
        if f.relative_to(ROOT).parts[0] != name:
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        found += [f"{f.relative_to(ROOT)}:{n}: {what}: {line}" for n, what, line in history_words(text)]
        if re.search(r"session\d", f.name, re.IGNORECASE):
            found.append(f"{f.relative_to(ROOT)}: file name")
    assert not found, "development history in the project's own text:\n" + "\n".join(found)


def test_readme_is_a_short_guide():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"
    assert lines[0].startswith("# ")
    head = "\n".join(lines[:30])
    assert "make train" in head and "make test" in head, "the two commands come first"

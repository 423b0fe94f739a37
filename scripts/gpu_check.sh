#!/usr/bin/env bash
# Every speed goal in one run: extraction (X-152, R-50) and end-to-end training (R-50, 448x448), float32
# and bfloat16, peak memory; writes OUT/gpu_check.json and OUT/gpu_check.md (with the git commit, the
# device's name and the date) and each part's JSON. Goals and how to read the table: docs/gpu.md.
#
#   scripts/gpu_check.sh OUT                        # one GPU, full sizes (about 5 minutes on an H100/H200)
#   scripts/gpu_check.sh OUT --device cpu --quick   # the same rows at tiny sizes, about a minute on a CPU
#
# Installs nothing beyond `make install` (run when .venv/ is missing). GPU_CHECK_PYTHON=/path/to/python
# uses that interpreter instead (one with gridvqa's requirements; this checkout's src/ goes on its path).
# Exit status 1 when a part failed.
set -euo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: scripts/gpu_check.sh OUT [--device cuda|cpu|auto] [--quick]" >&2
    exit 2
fi
out="$1"
shift
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${GPU_CHECK_PYTHON:-}" ]]; then
    python="$GPU_CHECK_PYTHON"
    export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}"
else
    python="$repo/.venv/bin/python"
    if [[ ! -x "$python" ]]; then
        make -C "$repo" install >&2
    fi
fi

# GPU_CHECK_COMMIT names the commit where the checkout travels without its .git folder.
commit="${GPU_CHECK_COMMIT:-$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)}"
if [[ -z "${GPU_CHECK_COMMIT:-}" && "$commit" != unknown && -n "$(git -C "$repo" status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
    commit="$commit+uncommitted-changes"
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$python" -m gridvqa.benchmarks.gpu_check "$out" --commit "$commit" "$@"

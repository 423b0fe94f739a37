"""End-to-end training step vs its parts: `python -m gridvqa.benchmarks.training` from a checkout.

    python scripts/bench_train.py [--preset paper_r50_448 | e2e] [--make-data] [--precision 32-true ...]
    python scripts/bench_train.py --quick          # tiny sizes on a generated set: seconds on a CPU

Flags and output: gridvqa/benchmarks/training.py (`--help`).
"""

from __future__ import annotations

import sys

from gridvqa.benchmarks.training import main

if __name__ == "__main__":
    sys.exit(main())

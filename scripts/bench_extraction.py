"""Grid vs region feature extraction speed: `python -m gridvqa.benchmarks.extraction` from a checkout.

    python scripts/bench_extraction.py --arch R-50 --size 600 1000 --images 6 --device cpu --batch 1

Flags and output: gridvqa/benchmarks/extraction.py (`--help`).
"""

from __future__ import annotations

import sys

from gridvqa.benchmarks.extraction import main

if __name__ == "__main__":
    sys.exit(main())

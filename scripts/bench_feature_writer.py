"""FeatureWriter foreground vs background: `python -m gridvqa.benchmarks.feature_writer` from a checkout.

    python scripts/bench_feature_writer.py --shape 38 63 2048 --images 64 --compute-ms 20 --commit-images 16

Flags and output: gridvqa/benchmarks/feature_writer.py (`--help`).
"""

from __future__ import annotations

import sys

from gridvqa.benchmarks.feature_writer import main

if __name__ == "__main__":
    sys.exit(main())

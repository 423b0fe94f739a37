"""`python -m gridvqa.report SWEEP_DIR [--out DIR] [--ignore KEY ...]`: one table for a sweep.

Reads every run's metrics.json under SWEEP_DIR, groups runs by configuration (overrides minus the
seed) and writes report.md, report.csv and report.png (mean ± std over seeds) into --out (default:
SWEEP_DIR). The logic is in `gridvqa.reporting`; no torch or lightning is imported.
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gridvqa.report", description=__doc__.split("\n")[2])
    parser.add_argument("sweep_dir", help="a sweep folder (e.g. logs/multiruns/<time>) or any folder of runs")
    parser.add_argument("--out", default=None, help="where report.md/.csv/.png go (default: SWEEP_DIR)")
    parser.add_argument(
        "--ignore",
        action="append",
        default=None,
        metavar="KEY",
        help="override keys that do not make a configuration (repeatable; default: seed)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")

    from gridvqa.errors import GridVQAError
    from gridvqa.reporting import to_markdown, write_report

    try:
        report, written = write_report(args.sweep_dir, args.out, ignore=args.ignore or ["seed"])
    except GridVQAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(to_markdown(report))
    for path in written.values():
        print(f"wrote {path}")
    if "png" not in written:
        print(f"warning: no run logged {report.primary!r}; report.png not written", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

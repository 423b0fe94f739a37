"""`python -m gridvqa.reproduce [overrides]` (`make reproduce`): the paper's findings on the built-in data.

Steps, in order (config: conf/reproduce.yaml; what trains: conf/experiment/reproduce/*.yaml):

    data        the built-in data set, when the data root has none
    pretrain    VG pre-training of the grid and the C4 detector       -> artifacts/reproduce/<name>/
    extract     grid and region features of train and val             -> DATA_ROOT/features/<kind>_<split>.h5
    train       one Hydra multirun per setting over the seeds         -> <runs_dir>/<setting>/seed_<n>/
                (conf/reproduce.yaml's settings; finetune and its control finetune_frozen start from
                their seed's frozen run)
    bench       gridvqa.benchmarks.extraction                         -> <results>/extraction_bench.json
    report      report.md/csv/png, extraction.png/md, results.md      -> <results>/
    readme      results.md into the <!-- reproduce:begin/end --> block of `readme` (docs/results.md)

A step runs only when its output is missing, incomplete, made with other settings, or older than an input
that changed or is remade in this run (as make does); otherwise it prints "skip: ...", so an interrupted
reproduce resumes. Interrupted training runs resume from their last.ckpt (`ckpt_path=last`); a run folder
made with other settings is moved to <runs_dir>/stale/ first. With jobs=N, up to N training runs (each
seed its own) run side by side, each with 1/N of the CPU threads and its output in <run folder>.log.

Every step is a subprocess (the real entry points), so this package only plans (plan.py), runs (run.py)
and reports (render.py): it imports neither torch nor Lightning.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from gridvqa.errors import GridVQAError
from gridvqa.reproduce.options import BEGIN, END, Options, kv, load_config, merge_overrides, rel, say
from gridvqa.reproduce.plan import Step, extraction_gap, plan, signature
from gridvqa.reproduce.render import (
    Verdict,
    bench_ratios,
    compare_better,
    compare_close,
    compare_cost,
    extraction_markdown,
    for_readme,
    read_block,
    render_results,
    replace_block,
    write_readme,
    write_results,
)
from gridvqa.reproduce.run import StepFailed, execute, multirun_command, threads_per_job

__all__ = [
    "BEGIN",
    "END",
    "Options",
    "Step",
    "StepFailed",
    "Verdict",
    "bench_ratios",
    "compare_better",
    "compare_close",
    "compare_cost",
    "execute",
    "extraction_gap",
    "extraction_markdown",
    "for_readme",
    "kv",
    "load_config",
    "main",
    "merge_overrides",
    "multirun_command",
    "plan",
    "read_block",
    "render_results",
    "replace_block",
    "reproduce",
    "signature",
    "threads_per_job",
    "write_readme",
    "write_results",
]


def reproduce(overrides: Sequence[str] = ()) -> list[str]:
    """Plan and run; returns the names of the steps that ran (none on a dry run)."""
    opts = Options.from_cfg(load_config(overrides))
    steps = plan(opts)
    if opts.jobs > 1:
        n = threads_per_job(opts.jobs)
        say(f"jobs={opts.jobs}: training runs side by side, {n} thread{'s' if n > 1 else ''} each")
    if opts.dry_run:
        for st in steps:
            say(f"would run: {st.name} ({st.reason})" if st.runs else f"skip: {st.name} ({st.note})")
        return []
    ran = execute(opts, steps)
    say(f"done: {len(ran)} step(s) ran, {len(steps) - len(ran)} skipped; results in {rel(opts.results_dir)}")
    return ran


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        print("Overrides (Hydra syntax) of conf/reproduce.yaml, e.g. seeds=[1] dry_run=true jobs=2")
        return 0
    try:
        reproduce(args)
    except KeyboardInterrupt:
        print("interrupted: the same command resumes where this one stopped", file=sys.stderr)
        return 130
    except GridVQAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - Hydra's override and composition errors: one line
        if type(e).__module__.startswith(("hydra", "omegaconf")):
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln[:1].isspace()]
            print(f"error: {' '.join(lines[:3])}", file=sys.stderr)
            return 1
        raise
    return 0

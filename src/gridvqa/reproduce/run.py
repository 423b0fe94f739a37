"""Running a plan: each step's commands as subprocesses (the real entry points), in plan order; with
jobs > 1, independent training runs side by side, each with its share of the CPU threads. A finished
step's minutes and settings go to steps.json."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from gridvqa.data.jsonio import atomic_write_json
from gridvqa.errors import GridVQAError
from gridvqa.reporting import override_key
from gridvqa.reproduce.options import STEPS_FILE, Options, kv, read_steps, rel, say
from gridvqa.reproduce.plan import Step
from gridvqa.reproduce.render import write_readme, write_results

# Steps that may run side by side when jobs > 1: training runs and their evaluations, which only read what
# earlier steps made. Data, extraction (which writes into the data root), the timing benchmark and the
# report run alone.
SIDE_BY_SIDE = ("pretrain", "train", "evaluate")


class StepFailed(GridVQAError):
    """A step's command failed or did not make what it should have."""


def _env(threads: int | None = None) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def _run(cmd: list[str]) -> int:
    return subprocess.run(cmd, env=_env(), check=False).returncode


def threads_per_job(jobs: int, env: Mapping[str, str] | None = None) -> int:
    """The CPU threads of one of `jobs` runs at once: OMP_NUM_THREADS (else the usable cores) divided."""
    env = os.environ if env is None else env
    try:
        total = int(env["OMP_NUM_THREADS"])
    except (KeyError, ValueError):
        total = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, total // jobs)


def multirun_command(opts: Options, group: Sequence[Step]) -> list[str]:
    """One `python -m gridvqa.train -m` over the seeds of one setting that need a run."""
    first = group[0]
    ovr = [o for o in first.overrides if override_key(o) != "seed"]
    return [
        opts.python, "-m", "gridvqa.train", "-m", *ovr,
        "seed=" + ",".join(str(st.seed) for st in group),
        kv("hydra.sweep.dir", opts.runs_dir / str(first.setting)),
        "hydra.sweep.subdir=seed_${seed}",
    ]  # fmt: skip


def _move_aside(opts: Options, run_dir: Path) -> Path:
    where = (
        run_dir.relative_to(opts.runs_dir) if run_dir.is_relative_to(opts.runs_dir) else Path(run_dir.name)
    )
    stem = opts.runs_dir / "stale" / f"{'_'.join(where.parts)}-{time.strftime('%Y%m%d-%H%M%S')}"
    dest, n = stem, 1
    while dest.exists():
        n += 1
        dest = stem.with_name(f"{stem.name}-{n}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(run_dir), dest)
    return dest


def _record(opts: Options, names: Sequence[str], minutes: float, sig: Mapping[str, list[str] | None]) -> None:
    data = read_steps(opts.results_dir)
    for name in names:
        data[name] = {
            "minutes": round(minutes / len(names), 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "signature": sig.get(name),
        }
    atomic_write_json(opts.results_dir / STEPS_FILE, {"format_version": 1, "steps": data}, indent=1)


def _start(opts: Options, group: Sequence[Step]) -> float:
    for st in group:
        say(f"run: {st.name} ({st.reason})")
        if st.move_aside is not None and st.move_aside.exists():
            say(f"  old run folder moved to {rel(_move_aside(opts, st.move_aside))}")
    return time.perf_counter()


def _check_made(group: Sequence[Step]) -> None:
    for st in group:
        if missing := [o for o in st.outputs if not o.exists()]:
            raise StepFailed(f"{st.name}: finished but {missing[0]} was not made")


def _finish(opts: Options, group: Sequence[Step], start: float) -> float:
    """Checks that the group made its outputs; records its minutes (split over its steps)."""
    _check_made(group)
    minutes = (time.perf_counter() - start) / 60
    if group[0].kind not in ("report", "readme"):
        _record(opts, [st.name for st in group], minutes, {st.name: st.signature for st in group})
    return minutes


def _units(steps: Sequence[Step]) -> list[list[Step]]:
    """Steps in plan order; the seeds of one setting train in one multirun."""
    units: list[list[Step]] = []
    for st in steps:
        last = units[-1][0] if units else None
        if st.kind == "train" and last is not None and last.kind == "train" and last.setting == st.setting:
            units[-1].append(st)
        else:
            units.append([st])
    return units


def _execute_unit(opts: Options, unit: Sequence[Step]) -> list[str]:
    for st in unit:
        if not st.runs:
            say(f"skip: {st.name} ({st.note})")
    group = [st for st in unit if st.runs]
    if not group:
        return []
    step = group[0]
    start = _start(opts, group)
    commands = [multirun_command(opts, group)] if step.kind == "train" else step.commands
    if step.kind == "report":
        write_results(opts)
    elif step.kind == "readme":
        write_readme(opts)
    for cmd in commands:
        say("$ " + shlex.join(cmd))
        rc = _run(cmd)
        if rc != 0:
            raise StepFailed(f"{step.name}: `{shlex.join(cmd)}` exited with status {rc}")
    _finish(opts, group, start)
    return [st.name for st in group]


@dataclass
class _Job:
    """A step running in the background, its output going to `log`."""

    step: Step
    cmd: list[str]
    log: Path
    proc: subprocess.Popen
    out: IO[bytes]
    start: float = field(default_factory=time.perf_counter)


def _launch(opts: Options, st: Step, threads: int) -> _Job:
    start = _start(opts, [st])
    cmd = multirun_command(opts, [st]) if st.kind == "train" else st.commands[0]
    assert st.run_dir is not None
    log = st.run_dir.with_name(st.run_dir.name + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    say(f"$ {shlex.join(cmd)} > {rel(log)}")
    out = log.open("wb")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(threads))
    return _Job(st, cmd, log, proc, out, start)


def _wait_any(running: Sequence[_Job]) -> list[_Job]:
    while True:
        finished = [j for j in running if j.proc.poll() is not None]
        if finished:
            return finished
        time.sleep(0.2)


def _stop(running: Sequence[_Job]) -> None:
    for job in running:
        job.proc.terminate()
    for job in running:
        try:
            job.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            job.proc.kill()
            job.proc.wait()
        job.out.close()


def _dependencies(todo: Sequence[Step]) -> dict[str, set[str]]:
    """Per step, the earlier steps of `todo` that make one of its inputs (finetune: its seed's frozen)."""
    return {
        st.name: {o.name for o in todo[:i] if set(o.outputs) & set(st.inputs)} for i, st in enumerate(todo)
    }


def _execute_side_by_side(opts: Options, block: Sequence[Step]) -> list[str]:
    """Up to `opts.jobs` of the block's steps at once, each started once the steps it reads from are done.
    After a failure nothing new starts; the runs under way finish, then StepFailed names the first."""
    for st in block:
        if not st.runs:
            say(f"skip: {st.name} ({st.note})")
    todo = [st for st in block if st.runs]
    deps = _dependencies(todo)
    threads = threads_per_job(opts.jobs)
    running: list[_Job] = []
    done: list[str] = []
    failures: list[str] = []
    try:
        while todo or running:
            if not failures:
                _launch_ready(opts, todo, deps, set(done), running, threads)
            if not running:
                break
            for job in _wait_any(running):
                running.remove(job)
                job.out.close()
                if failure := _finish_job(opts, job):
                    failures.append(failure)
                    say(f"failed: {failure}")
                else:
                    done.append(job.step.name)
    except BaseException:
        _stop(running)
        raise
    if failures:
        raise StepFailed(failures[0])
    return [st.name for st in block if st.name in done]  # plan order, whichever finished first


def _launch_ready(
    opts: Options,
    todo: list[Step],
    deps: Mapping[str, set[str]],
    done: set[str],
    running: list[_Job],
    threads: int,
) -> None:
    """Starts the steps whose inputs are made, in plan order, while fewer than opts.jobs run."""
    while len(running) < opts.jobs:
        ready = next((st for st in todo if deps[st.name] <= done), None)
        if ready is None:
            return
        todo.remove(ready)
        running.append(_launch(opts, ready, threads))


def _finish_job(opts: Options, job: _Job) -> str | None:
    """None when the job's step is done (recorded), else what went wrong."""
    rc = job.proc.returncode
    if rc != 0:
        return f"{job.step.name}: `{shlex.join(job.cmd)}` exited with status {rc} (its output: {job.log})"
    try:
        minutes = _finish(opts, [job.step], job.start)
    except StepFailed as e:
        return f"{e} (its output: {job.log})"
    say(f"done: {job.step.name} ({minutes:.1f} min)")
    return None


def _blocks(steps: Sequence[Step], jobs: int) -> list[tuple[bool, list[Step]]]:
    """(side by side?, steps): consecutive training steps form one block when jobs > 1; the other
    steps, in between, run one after the other."""
    blocks: list[tuple[bool, list[Step]]] = []
    for st in steps:
        together = jobs > 1 and st.kind in SIDE_BY_SIDE
        if blocks and blocks[-1][0] == together:
            blocks[-1][1].append(st)
        else:
            blocks.append((together, [st]))
    return blocks


def execute(opts: Options, steps: Sequence[Step]) -> list[str]:
    """Run the steps that need it, in order (training runs side by side when opts.jobs > 1); returns the
    names of those that ran. Stops at the first failure with a StepFailed naming the step and command."""
    ran: list[str] = []
    for together, block in _blocks(steps, opts.jobs):
        if together:
            ran += _execute_side_by_side(opts, block)
        else:
            for unit in _units(block):
                ran += _execute_unit(opts, unit)
    return ran

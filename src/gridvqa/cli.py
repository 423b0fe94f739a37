"""How every `python -m gridvqa.<entry>` runs (train, extract, evaluate, predict, visualize).

`entry_point("train", check_train)` turns a function of the composed config into the Hydra main of an
entry module. Around the function it applies the top-level `data_root=DIR` alias, checks the config
(`gridvqa.config_checks`) before any work, and turns a user error (a GridVQAError, or an OS error
about a named file: no permission, disk full, no such file) into one line on stderr and exit status 1.
Anything else is a bug: it propagates, and Hydra prints its traceback. Before any of this, the Hydra
callback `gridvqa.hydra_callbacks.CheckOutputDir` (conf/hydra/default.yaml) stops a run whose log
folder cannot be made, in the same one-line form.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from omegaconf import DictConfig

from gridvqa.config import conf_dir, register_resolvers

T = TypeVar("T")


def run_task(body: Callable[[DictConfig], T], cfg: DictConfig,
             check: Callable[[DictConfig], None] | None = None) -> T:
    """`body(cfg)` after the alias and the checks; a user error exits 1 with one line on stderr."""
    from gridvqa.config_checks import apply_data_root
    from gridvqa.errors import user_error_line

    try:
        apply_data_root(cfg)
        if check is not None:
            check(cfg)
        return body(cfg)
    except Exception as e:  # noqa: BLE001 - sorted below: user errors get a line, bugs re-raise
        line = user_error_line(e)
        if line is None:
            raise
        exit_with_error(line)


def exit_with_error(line: str) -> NoReturn:
    """How an entry point stops on a user error: `error: <line>` on stderr, exit status 1."""
    sys.stdout.flush()  # what the job printed comes before the error
    print(f"error: {line}", file=sys.stderr, flush=True)
    sys.exit(1)


def entry_point(config_name: str, check: Callable[[DictConfig], None] | None = None,
                ) -> Callable[[Callable[[DictConfig], T]], Callable[[], Any]]:
    """Decorator: the Hydra main of an entry module, reading conf/<config_name>.yaml."""
    import hydra

    register_resolvers()

    def decorate(body: Callable[[DictConfig], T]) -> Callable[[], Any]:
        @functools.wraps(body)  # Hydra names the job after the entry module's file
        def task(cfg: DictConfig) -> T:
            return run_task(body, cfg, check)

        return hydra.main(version_base="1.3", config_path=conf_dir(), config_name=config_name)(task)

    return decorate

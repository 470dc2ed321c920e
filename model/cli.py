"""Running a stage from the command line: flags from its config dataclass, mistakes in one line.

A user's mistake (a data root with nothing there, an unknown name, a weights file that is not
one) is an ``OSError`` or a ``ValueError`` raised with a message that says what is wrong and
what was expected; the command prints it as one ``error:`` line per problem (a message of
several problems puts one on each line) and exits with status 2 instead of a traceback.
``CIRRAY_DEBUG=1`` shows the traceback too.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pprint
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import tyro

__all__ = ["USER_ERRORS", "location_problems", "log_settings", "run_cli"]

Conf = TypeVar("Conf")

USER_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError)


def location_problems(**flags: str) -> list[str]:
    """``"--flag: what is wrong"`` for each storage location (``s3://`` bucket) that cannot be
    used; keyword names are the flags' names with ``_`` for ``-``."""
    from model import storage

    problems = []
    for name, uri in flags.items():
        problem = storage.bucket_problem(uri)
        if problem:
            problems.append(f"--{name.replace('_', '-')}: {problem}")
    return problems


def log_settings(logger: logging.Logger, stage: str, conf: Any) -> None:
    """A stage's resolved settings, logged once as it starts: what a run did is in its log."""
    settings = dataclasses.asdict(conf) if dataclasses.is_dataclass(conf) else conf
    logger.info("%s settings:\n%s", stage, pprint.pformat(settings, sort_dicts=False))


def run_cli(main: Callable[[Conf], Any], conf_type: type[Conf]) -> None:
    """Parse ``sys.argv`` into ``conf_type`` and run ``main`` on it.

    A config made of parts (nested dataclasses) keeps flat flag names: ``--lr``, not
    ``--gem.lr``; the parts' field names are distinct for that reason."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    conf = tyro.cli(conf_type, config=(tyro.conf.OmitArgPrefixes,))
    try:
        main(conf)
    except USER_ERRORS as err:
        if os.environ.get("CIRRAY_DEBUG"):
            raise
        problems = [" ".join(line.split()) for line in str(err).splitlines()]
        for problem in [p for p in problems if p] or [type(err).__name__]:
            print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(2) from None

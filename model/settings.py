"""How a settings part reports what is wrong with it: every problem at once, as flag names.

A part (a frozen dataclass of a stage's config) checks itself when it is made, so the Python
API gets the command line's checks. On the command line the parts are made while the flags
are parsed; there ``model.cli.run_cli`` holds the checks back (``checks_deferred``) and makes
the whole config again afterwards, so that every problem prints as one ``error:`` line.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

__all__ = ["checks_deferred", "raise_problems"]

_DEFERRED = contextvars.ContextVar("cirray_checks_deferred", default=False)


def raise_problems(problems: list[str]) -> None:
    """One ``ValueError`` holding every problem, a line each (none: nothing happens)."""
    if problems and not _DEFERRED.get():
        raise ValueError("\n".join(problems))


@contextlib.contextmanager
def checks_deferred() -> Iterator[None]:
    """Parts made inside raise nothing; make them again outside to check them."""
    token = _DEFERRED.set(True)
    try:
        yield
    finally:
        _DEFERRED.reset(token)

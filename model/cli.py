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
import re
import sys
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import tyro

from model import storage
from model.records import LeaseHeld, LeaseLost
from model.settings import checks_deferred, raise_problems

__all__ = [
    "MEMORY_UNITS",
    "USER_ERRORS",
    "FlatFlags",
    "location_problems",
    "log_settings",
    "parse_memory",
    "run_cli",
]

Conf = TypeVar("Conf")

USER_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, LeaseHeld, LeaseLost)


class FlatFlags:
    """A config made of parts (nested frozen dataclasses) that is set by flat flag names.

    The command line omits the parts' prefixes (``--lr``, not ``--gem.lr``: ``run_cli``), so
    the parts' field names are distinct; ``from_flags``, ``replaced`` and ``settings`` give the
    Python API the same flat names, checked by each part as it is made."""

    @classmethod
    def from_flags(cls, **flags: Any) -> Any:
        """The config from its settings by flag name (``max_size=64``, not
        ``network=NetworkSettings(max_size=64)``)."""
        made = _made_from_flags(cls, flags)
        if flags:
            raise TypeError(f"{cls.__name__} has no setting {', '.join(sorted(flags))}")
        return made

    def replaced(self, **flags: Any) -> Any:
        """This config with ``flags`` changed, by flag name (a part's fields too)."""
        changed = _replaced_by_flags(self, flags)
        if flags:
            raise TypeError(f"{type(self).__name__} has no setting {', '.join(sorted(flags))}")
        return changed

    def settings(self) -> dict[str, Any]:
        """Every setting by flag name, the parts' too."""
        return flat_settings(self)


def checked(conf: Any) -> Any:
    """``conf`` made again, its parts first, so each checks itself (``model.settings``); one
    ``ValueError`` names every problem of every part."""
    if not dataclasses.is_dataclass(conf) or isinstance(conf, type):  # an instance, not a class
        return conf
    problems: list[str] = []
    parts = {}
    for field in dataclasses.fields(conf):
        value = getattr(conf, field.name)
        if dataclasses.is_dataclass(value):
            try:
                parts[field.name] = checked(value)
            except ValueError as err:
                problems += str(err).splitlines()
    try:
        conf = dataclasses.replace(conf, **parts)
    except ValueError as err:
        problems += str(err).splitlines()
    raise_problems(problems)
    return conf


def flat_settings(conf: Any) -> dict[str, Any]:
    """``conf``'s fields by flag name, those of its parts (nested dataclasses) among them."""
    flat: dict[str, Any] = {}
    for field in dataclasses.fields(conf):
        value = getattr(conf, field.name)
        if dataclasses.is_dataclass(value):
            flat.update(flat_settings(value))
        else:
            flat[field.name] = value
    return flat


def _parts(conf_type: type) -> dict[str, type]:
    """The fields of ``conf_type`` that are parts (dataclasses), with their types."""
    hints = typing.get_type_hints(conf_type)
    return {
        f.name: hints[f.name]
        for f in dataclasses.fields(conf_type)
        if isinstance(hints[f.name], type) and dataclasses.is_dataclass(hints[f.name])
    }


def _own_flags(conf_type: type, flags: dict[str, Any]) -> dict[str, Any]:
    """The flags ``conf_type``'s own fields take, taken out of ``flags``."""
    own = {f.name for f in dataclasses.fields(conf_type)} - set(_parts(conf_type))
    return {name: flags.pop(name) for name in list(flags) if name in own}


def _made_from_flags(conf_type: type, flags: dict[str, Any]) -> Any:
    """``conf_type`` made from the flags it and its parts take (taken out of ``flags``); a
    part starts from its field's default, as on the command line."""
    own = _own_flags(conf_type, flags)
    defaults = {f.name: f for f in dataclasses.fields(conf_type)}
    parts = {}
    for name, part in _parts(conf_type).items():
        default = _default(defaults[name])
        parts[name] = (
            _made_from_flags(part, flags) if default is None else _replaced_by_flags(default, flags)
        )
    return conf_type(**own, **parts)


def _default(field: dataclasses.Field) -> Any:
    """A field's default value, ``None`` when it has none."""
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def _replaced_by_flags(conf: Any, flags: dict[str, Any]) -> Any:
    """``conf`` with the flags it and its parts take changed (taken out of ``flags``)."""
    own = _own_flags(type(conf), flags)
    parts = {name: _replaced_by_flags(getattr(conf, name), flags) for name in _parts(type(conf))}
    return dataclasses.replace(conf, **own, **parts)


MEMORY_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
"""Bytes of each unit a memory flag takes (binary: 1K is 1024)."""


def parse_memory(text: str | int) -> int:
    """Bytes of ``"16G"``, ``"512M"``, ``"1.5G"``, ``"64KiB"`` or a plain number (units of 1024)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(?:I?B)?\s*", str(text).upper())
    if not match:
        raise ValueError(f"cannot read memory size {text!r}: write e.g. 512M, 16G or 1.5T")
    return int(float(match.group(1)) * MEMORY_UNITS[match.group(2)])


def location_problems(**flags: str) -> list[str]:
    """``"--flag: what is wrong"`` for each storage location that cannot be used: an ``s3://``
    bucket that is not there, or a path only this machine sees when the work runs on several
    (``cluster.resources.node_local_problems``); keyword names are the flags' names with ``_``
    for ``-``."""
    from cluster.resources import node_local_problems  # Ray only when a cluster is named

    problems = []
    for name, uri in flags.items():
        problem = storage.bucket_problem(uri)
        if problem:
            problems.append(f"--{name.replace('_', '-')}: {problem}")
    return problems + node_local_problems(**flags)


def log_settings(logger: logging.Logger, stage: str, conf: Any) -> None:
    """A stage's resolved settings, logged once as it starts: what a run did is in its log."""
    settings = flat_settings(conf) if dataclasses.is_dataclass(conf) else conf
    logger.info("%s settings:\n%s", stage, pprint.pformat(settings, sort_dicts=False))


def run_cli(main: Callable[[Conf], Any], conf_type: type[Conf]) -> None:
    """Parse ``sys.argv`` into ``conf_type`` and run ``main`` on it.

    A config made of parts (nested dataclasses) keeps flat flag names: ``--lr``, not
    ``--gem.lr``; the parts' field names are distinct for that reason."""
    if "--version" in sys.argv[1:]:
        from model.tables import code_version  # only for this one question

        print(f"cirray {code_version()}")
        raise SystemExit(0)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    with checks_deferred():  # tyro would draw a part's problems in a box of its own
        parsed = tyro.cli(conf_type, config=(tyro.conf.OmitArgPrefixes,))
    try:
        main(checked(parsed))
    except USER_ERRORS as err:
        if os.environ.get("CIRRAY_DEBUG"):
            raise
        problems = [" ".join(line.split()) for line in str(err).splitlines()]
        for problem in [p for p in problems if p] or [type(err).__name__]:
            print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(2) from None

"""``cirray COMMAND [FLAGS]``: each stage's command line under one name, as installed by pip.

cirray run --source PHOTOS --output RUN      # python -m pipeline.run …
cirray extract --images … --output …         # python -m pipeline.extract …
"""

from __future__ import annotations

import runpy
import sys

from model.tables import code_version

COMMANDS = (
    "run",
    "ingest",
    "extract",
    "group",
    "sfm",
    "pairs",
    "whiten",
    "train",
    "index",
    "serve",
    "report",
    "evaluate",
    "demo",
    "compare",
)
"""The ``pipeline`` modules a user runs, in the order of the chain after ``run``."""


def main(argv: list[str] | None = None) -> None:
    """Run ``pipeline.COMMAND`` as ``python -m`` runs it, with the remaining arguments."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--version"]:
        print(f"cirray {code_version()}")
        return
    if not args or args[0] not in COMMANDS:
        wanted = repr(args[0]) if args and not args[0].startswith("-") else "a command"
        asked_for_help = args[:1] in (["-h"], ["--help"])
        line = f"usage: cirray COMMAND [FLAGS]; {wanted} is not one of: {', '.join(COMMANDS)}"
        print(line, file=sys.stdout if asked_for_help else sys.stderr)
        raise SystemExit(0 if asked_for_help else 2)
    sys.argv = [f"cirray {args[0]}", *args[1:]]
    runpy.run_module(f"pipeline.{args[0]}", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()

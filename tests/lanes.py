"""``make test``: the whole suite as two pytest sessions side by side on one machine.

    python -m tests.lanes [PYTEST ARGS...]

The tests marked ``side_lane`` (the ones that run Ray clusters and jobs of their own) run in a
second session, at a lower CPU priority (``nice`` 10), beside the others. Much of their time is
spent waiting on clusters and jobs, and the other tests leave cores idle while they wait on
Serve, Ray Train and Ray Data in turn; each lane fills the other's idle time, and the main
lane gets most of the cores whenever both want them. The side lane's output follows the main
lane's; the exit status is the first non-zero of the two (pytest's "no tests collected", 5,
counts as success for a lane whose marker selected nothing).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

SIDE = "side_lane"
NICENESS = 10
NO_TESTS_COLLECTED = 5


def _lane_status(code: int) -> int:
    return 0 if code == NO_TESTS_COLLECTED else code


def _wait(lane: subprocess.Popen) -> int:
    """The lane's exit status. Ctrl-C reaches every process of the terminal's group, the lanes
    too, and each pytest then tears its fixtures down (servers, Ray): that is waited for."""
    while True:
        try:
            return lane.wait()
        except KeyboardInterrupt:
            continue


def main(args: list[str]) -> int:
    pytest = [sys.executable, "-m", "pytest", *args]
    with tempfile.TemporaryDirectory(prefix="cirray-side-lane-") as folder:
        log = Path(folder) / "side.log"
        with log.open("wb") as out:
            side = subprocess.Popen(
                [*pytest, "-m", SIDE],
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=lambda: os.nice(NICENESS),
            )
            main_lane = subprocess.Popen([*pytest, "-m", f"not {SIDE}"])
            main_code, side_code = _wait(main_lane), _wait(side)
        print(f"\n{'=' * 30} the side lane ({SIDE}) {'=' * 30}", flush=True)
        sys.stdout.buffer.write(log.read_bytes())
        sys.stdout.flush()
    return _lane_status(main_code) or _lane_status(side_code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

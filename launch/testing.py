"""Building blocks for sweeps that test the launcher itself (tests/test_launch.py, test_slurm.py,
test_ray.py): jobs that are a few lines of Python instead of a training."""

from __future__ import annotations

from collections.abc import Sequence

from launch.grids import GridOptions
from launch.jobs import Job


def marker_job(opts: GridOptions, name: str, code: str, deps: Sequence[str] = ()) -> Job:
    """`python -c CODE`, then the job's done marker `ROOT/out/NAME.done` is written, last,
    like card_jax's results.json: a job that exits early (sys.exit, an exception) is not done.

    CODE sees `root` (the sweep root, a pathlib.Path) and the modules os, sys, time, json.
    """
    marker = opts.root / "out" / f"{name}.done"
    program = (f"import json, os, pathlib, sys, time\nroot = pathlib.Path({str(opts.root)!r})\n"
               f"{code}\nmarker = pathlib.Path({str(marker)!r})\n"
               "marker.parent.mkdir(parents=True, exist_ok=True)\nmarker.write_text('ok')\n")
    return Job(name=name, kind="command", argv=("-c", program), workdir=str(marker.parent),
               done=(str(marker),), deps=tuple(deps))

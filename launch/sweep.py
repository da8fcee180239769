"""Command line for sweeps: `python -m launch.sweep COMMAND NAME [options]`.

  run NAME     run every job not done yet, in dependency order, on --backend (local, slurm or
               ray); finished jobs are skipped, interrupted ones resumed, failures retried
               --retries times; exit 0 only when every job is done
  status NAME  done / running / failed / pending / blocked per job, read from the sweep root
  retry NAME   forget the failure counts of failed jobs, then `run`
  list NAME    the jobs, their dependencies, done markers and command lines

NAME is a grid of launch.grids (embedded, sec22, sec33, cifar100) or `package.module:function`.
The sweep root (--root, default workdirs/NAME, or workdirs/NAME_smoke with --smoke) holds
runs/, decks/, logs/<job>.<attempt>.log and .sweep/ (one state file per job).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import signal
import sys

from launch import grids as grids_lib
from launch import jobs as jobs_lib
from launch import scheduler

RECORD = "sweep.json"  # the grid options of the last `run`, so `status` needs only NAME


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    grid = argparse.ArgumentParser(add_help=False)
    grid.add_argument("name", help="embedded | sec22 | sec33 | cifar100 | package.module:function")
    grid.add_argument("--root", default=None,
                      help="sweep folder (default workdirs/NAME[_smoke], or the one recorded)")
    grid.add_argument("--smoke", action=argparse.BooleanOptionalAction, default=None,
                      help="the grid's seconds-long synthetic variant")
    grid.add_argument("--data_dir", default=None, help="data.dir of every run")
    grid.add_argument("--corruption_dir", default=None,
                      help="paper grids: a released -C folder ('' = generate one)")
    grid.add_argument("--only", default=None, metavar="REGEX",
                      help="just the jobs whose name matches, and what they depend on")
    execution = argparse.ArgumentParser(add_help=False)
    execution.add_argument("--backend", choices=("local", "slurm", "ray"), default="local")
    execution.add_argument("--retries", type=int, default=1,
                           help="re-runs of a failed job before it counts as failed (default 1)")
    execution.add_argument("--max_parallel", type=int, default=None,
                           help="jobs at a time (local default: cpu count // threads_per_job; "
                                "slurm/ray: unlimited)")
    local = execution.add_argument_group("local backend")
    local.add_argument("--threads_per_job", type=int, default=None,
                       help="CPUs per job (default: the grid's LOCAL_THREADS_PER_JOB entry, "
                            "else all, i.e. one job at a time; 0 = all)")
    slurm = execution.add_argument_group("slurm backend (submitit)")
    slurm.add_argument("--partition", default=None)
    slurm.add_argument("--account", default=None)
    slurm.add_argument("--time", type=int, default=24 * 60, help="minutes per job")
    slurm.add_argument("--gpus_per_node", type=int, default=0)
    slurm.add_argument("--cpus_per_task", type=int, default=None)
    slurm.add_argument("--mem", type=float, default=None, help="GB per job")
    slurm.add_argument("--array", action="store_true",
                       help="submit the jobs that become ready together as one job array")
    slurm.add_argument("--slurm_poll", type=float, default=5.0,
                       help="seconds between squeue calls")
    ray = execution.add_argument_group("ray backend")
    ray.add_argument("--ray_address", default=None,
                     help="cluster address (default: start a local Ray on this machine)")
    ray.add_argument("--num_cpus", type=float, default=1, help="CPUs per Ray task")
    ray.add_argument("--num_gpus", type=float, default=0, help="GPUs per Ray task")
    commands.add_parser("run", parents=[grid, execution], help="run what is not done")
    commands.add_parser("retry", parents=[grid, execution], help="reset failures, then run")
    commands.add_parser("status", parents=[grid], help="per-job status")
    commands.add_parser("list", parents=[grid], help="jobs and command lines")
    return parser


def _grid_options(args) -> tuple[grids_lib.GridOptions, pathlib.Path]:
    """Flags, else what the last `run` in this root recorded, else the defaults."""
    smoke = bool(args.smoke)
    root = pathlib.Path(os.path.abspath(args.root or grids_lib.default_root(args.name, smoke)))
    recorded = {}
    try:
        recorded = json.loads((root / jobs_lib.STATE_DIR / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    if recorded.get("name") != args.name:
        recorded = {}

    def pick(key, default):
        value = getattr(args, key)
        return value if value is not None else recorded.get(key, default)

    opts = grids_lib.GridOptions(root=root, data_dir=pick("data_dir", ""),
                                 corruption_dir=pick("corruption_dir", ""),
                                 smoke=pick("smoke", False))
    return opts, root


def _select(jobs: list[jobs_lib.Job], pattern: str | None) -> list[jobs_lib.Job]:
    """Jobs whose name matches `pattern`, plus everything they need."""
    if not pattern:
        return jobs
    by_name = {j.name: j for j in jobs}
    keep: set[str] = set()
    stack = [j.name for j in jobs if re.search(pattern, j.name)]
    while stack:
        name = stack.pop()
        if name not in keep:
            keep.add(name)
            stack += by_name[name].deps
    if not keep:
        raise ValueError(f"--only={pattern!r} matches no job")
    return [j for j in jobs if j.name in keep]


def compile_cache_env(root: pathlib.Path) -> dict[str, str]:
    """JAX's persistent compilation cache, shared by the sweep's local jobs.

    Runs of one sweep compile the same programs (the eval step of every magnitude method, the
    train step of LTH/LRR levels and CARDs, heat maps); each compile is a few seconds on 2
    CPUs. Entries are keyed by the program and the backend, so sharing is safe. A cache the
    user set already is left as it is.
    """
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return {}
    return {"JAX_COMPILATION_CACHE_DIR": str(root / jobs_lib.STATE_DIR / "jax_cache"),
            # The default (1 s) skips the many sub-second compiles of small eval programs.
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def make_backend(args, root: pathlib.Path):
    if args.backend == "local":
        from launch.local import LocalBackend

        threads = args.threads_per_job
        if threads is None:
            threads = grids_lib.LOCAL_THREADS_PER_JOB.get(args.name)
        return LocalBackend(args.max_parallel, threads or None, env=compile_cache_env(root))
    if args.backend == "slurm":
        from launch.slurm import SlurmBackend

        return SlurmBackend(root, partition=args.partition, account=args.account,
                            time_min=args.time, gpus_per_node=args.gpus_per_node,
                            cpus_per_task=args.cpus_per_task, mem_gb=args.mem,
                            array=args.array, max_parallel=args.max_parallel,
                            poll_interval_s=args.slurm_poll)
    from launch.ray_backend import RayBackend

    return RayBackend(address=args.ray_address, num_cpus=args.num_cpus,
                      num_gpus=args.num_gpus, max_parallel=args.max_parallel)


def _raise_interrupt(signum, frame):
    del signum, frame
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        opts, root = _grid_options(args)
        jobs = _select(grids_lib.expand(args.name, opts), args.only)
    except Exception as e:  # a grid that cannot expand: one line, not a traceback
        print(f"error: cannot expand sweep {args.name!r}: {type(e).__name__}: {e}",
              file=sys.stderr)
        return 2
    if args.command == "list":
        print(jobs_lib.describe(jobs))
        print(f"{len(jobs)} jobs, root {root}")
        return 0
    if args.command == "status":
        rows = list(scheduler.sweep_status(jobs, root).values())
        print(scheduler.format_table(rows))
        listing = scheduler.failure_listing(rows)
        if listing:
            print(listing)
        return 0 if all(r.status == scheduler.DONE for r in rows) else scheduler.EXIT_INCOMPLETE
    if args.retries < 0:
        print("error: --retries must be >= 0", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _raise_interrupt)  # scancel / kill: stop jobs, keep state
    try:
        with scheduler.sweep_lock(root):
            (root / jobs_lib.STATE_DIR / RECORD).write_text(json.dumps(
                {"name": args.name, "smoke": opts.smoke, "data_dir": opts.data_dir,
                 "corruption_dir": opts.corruption_dir}) + "\n", encoding="utf-8")
            if args.command == "retry":
                reset = scheduler.reset_failures(jobs, root)
                print(f"retry: reset the failure count of {len(reset)} job(s)"
                      + (": " + ", ".join(reset) if reset else ""))
            backend = make_backend(args, root)
            try:
                return scheduler.Scheduler(jobs, root, backend, args.retries).run()
            finally:
                backend.close()
    except scheduler.SweepBusyError as e:
        print(f"error: {e}", file=sys.stderr)
        return scheduler.EXIT_BUSY
    except KeyboardInterrupt:  # before the scheduler took over (e.g. while Ray starts)
        return scheduler.EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

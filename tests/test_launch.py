"""launch/: grid expansion and names, dependency order, and the local backend end to end.

The local-backend tests drive `python -m launch.sweep` in subprocesses on tiny sweeps defined
in a module written to tmp_path (jobs are `python -c` lines and seconds-long smoke trainings),
so they exercise exactly what a user runs, including being killed with SIGKILL.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from launch import grids, jobs, scheduler
from tests.helpers import REPO, cli_env

# ------------------------------------------------------------------------------------------
# Grid expansion
# ------------------------------------------------------------------------------------------


def _embedded(root, smoke=False, **knobs):
    base = grids.EMBEDDED_SMOKE if smoke else grids.EmbeddedKnobs()
    opts = grids.GridOptions(root=pathlib.Path(root), smoke=smoke)
    return jobs.check_graph(grids.embedded(opts, dataclasses.replace(base, **knobs)))


def _prefix(name: str) -> str:
    return name.rpartition("-")[0]


def test_embedded_grid_has_the_exact_jobs_and_command_lines(tmp_path):
    root = tmp_path / "emb"
    expanded = _embedded(root)
    by_prefix = {_prefix(j.name): j for j in expanded}
    assert list(by_prefix) == [
        "corrupt-fashion_mnist", "conv4-lrr-0.8-augmix", "conv4-lrr-0.8-gaussian",
        "conv4-dense", "conv4-gmp-0.8", "conv4-ep-0.8", "conv4-bp-0.8", "conv4-lth-0.8",
        "conv4-lrr-0.8", "conv4-ft-0.8", "deck-lrr-0.8", "heatmap-conv4-dense",
        "heatmap-conv4-lrr-0.8-augmix", "heatmap-conv4-lrr-0.8-gaussian", "report"]
    cdir = root / "fashion_mnist_c"
    corrupt = by_prefix["corrupt-fashion_mnist"]
    assert corrupt.argv == ("-m", "card_jax.corrupt", "--dataset=fashion_mnist", f"--out={cdir}",
                            "--examples=500", "--progress=log")
    assert len(corrupt.done) == 19 + 2 and str(cdir / "info.json") in corrupt.done
    common = ("--config.train.epochs=0.5", f"--config.eval.corruption_dir={cdir}",
              "--config.eval.corruption_examples=500", "--config.eval.extra_corruptions=True")

    dense = by_prefix["conv4-dense"]

    def run_argv(prefix, spec, *overrides, deps=(corrupt.name,)):
        job = by_prefix[prefix]
        assert job.workdir == str(root / "runs" / job.name)
        assert job.done == (str(root / "runs" / job.name / "results.json"),)
        assert job.deps == deps
        assert job.kind == "train"
        return job.argv == ("-m", "card_jax.main", f"--config={spec}",
                            f"--workdir={job.workdir}", *overrides)

    pruned = ("--config.method.sparsity=0.8", "--config.method.scope=global")
    # ft/lth/lrr copy their level 0 from the dense run, so they wait for it.
    shared = (f"--config.method.level0_from={dense.workdir}",)
    after_dense = (corrupt.name, dense.name)
    assert run_argv("conv4-dense", "configs/default.py", "--config.method.name=dense", *common)
    assert run_argv("conv4-ft-0.8", "configs/default.py", "--config.method.name=ft", *pruned,
                    *common, *shared, deps=after_dense)
    assert run_argv("conv4-gmp-0.8", "configs/default.py", "--config.method.name=gmp", *pruned,
                    "--config.method.frequency=20", *common)
    for m in ("lth", "lrr"):
        assert run_argv(f"conv4-{m}-0.8", "configs/default.py", f"--config.method.name={m}",
                        *pruned, "--config.method.levels=1", *common, *shared,
                        deps=after_dense)
    for m in ("ep", "bp"):
        assert run_argv(f"conv4-{m}-0.8", "configs/default.py", f"--config.method.name={m}",
                        *pruned, "--config.method.warmup_epochs=0", *common)
    for aug in ("augmix", "gaussian"):
        assert run_argv(f"conv4-lrr-0.8-{aug}", f"configs/default.py:{aug}",
                        "--config.method.name=lrr", *pruned, "--config.method.levels=1",
                        *common, "--config.eval.generate_corruptions=False")
    augmix, gaussian = by_prefix["conv4-lrr-0.8-augmix"], by_prefix["conv4-lrr-0.8-gaussian"]
    deck = by_prefix["deck-lrr-0.8"]
    assert deck.kind == "deck" and deck.deps == (augmix.name, gaussian.name)
    assert deck.argv == ("-m", "card_jax.main", "--config=configs/deck.py",
                         f"--workdir={root / 'decks' / deck.name}",
                         f"--config.deck.members={augmix.workdir},{gaussian.workdir}",
                         f"--config.eval.corruption_dir={cdir}")
    dense_map = by_prefix["heatmap-conv4-dense"]
    assert dense_map.argv == ("-m", "card_jax.heatmaps", f"--workdir={dense.workdir}",
                              "--eps=4", "--examples=100")
    assert dense_map.deps == (dense.name,)
    assert dense_map.done == (f"{dense.workdir}/heatmaps/heatmap.json",)
    for run in (augmix, gaussian):
        heat = by_prefix[f"heatmap-{_prefix(run.name)}"]
        assert heat.argv == ("-m", "card_jax.heatmaps", f"--workdir={run.workdir}",
                             f"--baseline={dense.workdir}", "--eps=4", "--examples=100")
        assert heat.deps == (run.name, dense.name, dense_map.name)
    report = by_prefix["report"]
    assert report.argv == ("-m", "card_jax.report", f"--runs={root}", f"--out={root / 'report'}")
    assert set(report.deps) == {j.name for j in expanded} - {report.name}
    assert report.done == (str(root / "report" / "report.md"),)


def _check_main_overrides(job: jobs.Job, monkeypatch) -> None:
    """What `card_jax.main` checks before it runs (its `precheck`), minus the dataset files."""
    from card_jax import config_util, main
    from card_jax.data import sources

    args = list(job.argv[2:])
    assert job.argv[:2] == ("-m", "card_jax.main")
    if job.kind == "train":
        monkeypatch.setattr(sources, "check_available", lambda *a, **k: None)
        main.precheck(args)
    else:  # a deck's precheck also opens its members, which do not exist yet
        spec = next(a.split("=", 1)[1] for a in args if a.startswith("--config="))
        config_util.apply_overrides(config_util.load_config_file(spec), args)
    assert any(a.startswith("--workdir=") for a in args)


@pytest.mark.parametrize("smoke", [False, True])
def test_embedded_overrides_are_valid_card_jax_options(tmp_path, smoke, monkeypatch):
    monkeypatch.chdir(REPO)  # config paths in the command lines are relative to the checkout
    expanded = _embedded(tmp_path, smoke=smoke)
    checked = [j for j in expanded if j.kind in ("train", "deck")]
    assert len(checked) == 10
    for job in checked:
        _check_main_overrides(job, monkeypatch)


def test_names_are_stable_and_change_only_with_the_job(tmp_path):
    first = [j.name for j in _embedded(tmp_path)]
    assert first == [j.name for j in _embedded(tmp_path)]

    def changed(**knobs):
        new = {_prefix(j.name): j.name for j in _embedded(tmp_path, **knobs)}
        old = {_prefix(n): n for n in first}
        assert new.keys() == old.keys()
        return {p for p in old if old[p] != new[p]}

    heat = {"heatmap-conv4-dense", "heatmap-conv4-lrr-0.8-augmix",
            "heatmap-conv4-lrr-0.8-gaussian"}
    assert changed(heatmap_examples=50) == heat
    cards = {"conv4-lrr-0.8-augmix", "conv4-lrr-0.8-gaussian"}
    # Every pruned run (CARDs too), and what refers to the CARDs; dense and its map stay.
    assert changed(scope="layerwise") == ({f"conv4-{m}-0.8" for m in ("ft", "gmp", "lth", "lrr",
                                                                       "ep", "bp")}
                                          | cards | {"deck-lrr-0.8"}
                                          | heat - {"heatmap-conv4-dense"})
    # The CARDs' settings reach their deck and heat maps (they name the CARD workdirs).
    assert changed(lth_levels=2) == ({"conv4-lth-0.8", "conv4-lrr-0.8", "deck-lrr-0.8"}
                                     | cards | heat - {"heatmap-conv4-dense"})
    # The "-C" set's size changes it, every run evaluated on it, and what names those runs.
    assert changed(corruption_examples=1000) == {_prefix(n) for n in first} - {"report"}
    # Adding a grid point renames nothing else.
    fewer = {j.name for j in _embedded(tmp_path, methods=("ft", "gmp"))}
    assert fewer <= {j.name for j in _embedded(tmp_path, methods=("ft", "gmp", "lth"))}
    # A moved sweep root keeps its names.
    assert [_prefix(n) for n in first] == [_prefix(j.name) for j in _embedded(tmp_path / "x")]
    assert first == [j.name for j in _embedded(tmp_path / "x")]


def test_embedded_knobs_are_checked(tmp_path):
    for epochs, warmup in ((1, 0.5), (2, 1.5), (2, 2)):
        with pytest.raises(ValueError, match="ep_bp_warmup_epochs"):
            _embedded(tmp_path, epochs=epochs, ep_bp_warmup_epochs=warmup)
    _embedded(tmp_path, epochs=2, ep_bp_warmup_epochs=1)


# Train jobs: one dense_openlth level-0 source per model (sec22) or per model and augmentation.
@pytest.mark.parametrize("name,trains,decks", [("sec22", 5 * (2 + 8 * 5), 0),
                                               ("sec33", 4 * 3 * (2 + 6 * 2), 4 * 6 * 2 * 2),
                                               ("cifar100", 3 * (2 + 4 * 2), 4 * 2 * 2)])
def test_paper_grids_smoke_expand_to_valid_runs(tmp_path, name, trains, decks, monkeypatch):
    monkeypatch.chdir(REPO)
    expanded = grids.expand(name, grids.GridOptions(root=tmp_path, smoke=True))
    kinds = [j.kind for j in expanded]
    # smoke: synthetic 16x16 images, so no "-C" set; decks of 2 and 4 cards (R=2)
    assert (kinds.count("train"), kinds.count("deck"), kinds.count("corrupt")) == (
        trains, decks, 0)
    assert kinds[-1] == "report" and len(expanded[-1].deps) == len(expanded) - 1
    for job in expanded[:-1]:
        _check_main_overrides(job, monkeypatch)
        if job.kind == "train":
            assert ",smoke" in job.argv[2]
    _check_shared_level0(expanded, shared=3 * 5 * 5 if name == "sec22" else
                         (4 if name == "sec33" else 1) * 3 * 2 * 2)
    if decks:
        members = [a for j in expanded if j.kind == "deck" for a in j.argv
                   if a.startswith("--config.deck.members=")]
        # 2 cards: realization 0 of each run (DIR:0); 4 cards: both R=2 runs whole
        assert {":0," in m for m in members} == {True, False}
        assert len(members) == len(set(members)) == decks


def _grid_point(job: jobs.Job) -> tuple[list[str], str]:
    """(the config argument's parts before the method, the method) of a paper-grid run."""
    spec, _, arg = job.argv[2].partition(":")
    at = 1 if spec.endswith("paper_sec22.py") else 3  # MODEL,METHOD or DATASET,MODEL,AUG,METHOD
    parts = arg.split(",")
    return parts[:at], parts[at]


def _check_shared_level0(expanded: list[jobs.Job], shared: int) -> None:
    """ft/lth/lrr copy level 0 from the dense_openlth run of their grid point (model, and
    dataset and augmentation in sec33), which the report leaves out; no other run copies."""
    from card_jax.report import collect

    sources = {j.workdir: j for j in expanded if j.kind == "train"
               and _grid_point(j)[1] == "dense_openlth"}
    assert sources and all(pathlib.Path(w).parent.name == grids.LEVEL0_FOLDER for w in sources)
    copying = 0
    for job in expanded:
        given = [a.split("=", 1)[1] for a in job.argv
                 if a.startswith("--config.method.level0_from=")]
        if job.kind != "train" or _grid_point(job)[1] not in grids.LEVEL0_IS_DENSE:
            assert not given, job.argv
            continue
        (source,) = given
        copying += 1
        assert sources[source].name in job.deps
        assert _grid_point(sources[source])[0] == _grid_point(job)[0]
    assert copying == shared
    assert grids.LEVEL0_FOLDER in collect.SKIP_DIRS  # the report leaves the sources out


def test_launcher_level0_methods_are_the_dense_level0_methods():
    """LEVEL0_IS_DENSE restates `Method.dense_level0`; the two must agree."""
    from card_jax import pruning

    dense_level0 = {name for name in pruning.METHODS if pruning.from_config(
        {"name": name, "sparsity": 0.5}, total_steps=100, steps_per_epoch=10).dense_level0}
    assert dense_level0 == set(grids.LEVEL0_IS_DENSE)


def test_expansion_refuses_a_level0_source_that_trains_differently(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    opts = grids.GridOptions(root=tmp_path, smoke=True)
    source = grids.level0_source(opts, "configs/paper_sec22.py:conv4,dense_openlth,smoke",
                                 "conv4-dense_openlth")
    job = grids.shared_level0_job(opts, "conv4-lth-0.8", "configs/paper_sec22.py:conv4,lth,0.8,smoke",
                                  [], [], source)
    assert f"--config.method.level0_from={source.workdir}" in job.argv
    with pytest.raises(ValueError, match=r"optim\.lr: 0\.1 -> 0\.05"):
        grids.shared_level0_job(opts, "x", "configs/paper_sec22.py:conv4,lth,0.8,smoke",
                                ["--config.optim.lr=0.05"], [], source)
    with pytest.raises(ValueError, match="model"):  # another model's source
        grids.shared_level0_job(opts, "x", "configs/paper_sec22.py:conv8,lrr,0.8,smoke", [], [],
                                source)


def test_paper_grids_evaluate_on_a_generated_or_given_corruption_set(tmp_path):
    made = grids.expand("sec33", grids.GridOptions(root=tmp_path))
    corrupt = [j for j in made if j.kind == "corrupt"]
    assert len(corrupt) == 1 and "--dataset=cifar10" in corrupt[0].argv
    # The level-0 sources are evaluated on the clean test set only.
    trains = [j for j in made if j.kind == "train"
              and pathlib.Path(j.workdir).parent.name != grids.LEVEL0_FOLDER]
    assert all(corrupt[0].name in j.deps for j in trains)
    assert all(f"--config.eval.corruption_dir={tmp_path / 'cifar10_c'}" in j.argv
               for j in trains)
    assert {len(a.split(",")) for j in made if j.kind == "deck" for a in j.argv
            if a.startswith("--config.deck.members=")} == {2, 4}  # 6 cards = 2 whole R=3 runs
    given = grids.expand("sec22", grids.GridOptions(root=tmp_path, corruption_dir="/c10c",
                                                    data_dir="/cifar"))
    assert not [j for j in given if j.kind == "corrupt"]
    trains = [j for j in given if j.kind == "train"]
    assert all("--config.data.dir=/cifar" in j.argv for j in trains)
    assert all(("--config.eval.corruption_dir=/c10c" in j.argv)
               == (pathlib.Path(j.workdir).parent.name != grids.LEVEL0_FOLDER) for j in trains)


def test_check_graph_orders_and_refuses_bad_graphs():
    def job(name, *deps):
        return jobs.Job(name=name, kind="command", argv=("-c", ""), workdir="/x",
                        done=(f"/x/{name}",), deps=deps)

    order = jobs.check_graph([job("c", "b"), job("a"), job("b", "a")])
    assert [j.name for j in order] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="cycle: a -> b -> a"):
        jobs.check_graph([job("a", "b"), job("b", "a")])
    with pytest.raises(ValueError, match="unknown"):
        jobs.check_graph([job("a", "zz")])
    with pytest.raises(ValueError, match="two jobs"):
        jobs.check_graph([job("a"), job("a")])


def test_done_json_rejects_outputs_made_with_other_settings(tmp_path):
    meta = tmp_path / "heatmap.json"
    job = jobs.Job(name="h", kind="heatmap", argv=(), workdir=str(tmp_path), done=(str(meta),),
                   done_json=((str(meta), "examples", 200),))
    assert not jobs.is_done(job)
    meta.write_text(json.dumps({"examples": 100}))
    assert not jobs.is_done(job)
    meta.write_text(json.dumps({"examples": 200}))
    assert jobs.is_done(job)


# ------------------------------------------------------------------------------------------
# The local backend, through the command line
# ------------------------------------------------------------------------------------------

# A sweep module for the CLI (`fakegrid:NAME`). Jobs write their marker last, like card_jax.
FAKE_GRIDS = '''
from launch import grids
from launch.testing import marker_job as py


def chain(opts):
    """ok -> flaky (fails once) -> after_flaky; broken (fails until root/fixed exists) ->
    needs_broken."""
    return [
        py(opts, "ok", "print('ok runs')"),
        py(opts, "flaky", "f = root / 'flaky.once'\\n"
                          "if not f.exists(): f.write_text('x'); print('flaky fails'); sys.exit(4)",
           ["ok"]),
        py(opts, "after_flaky", "print('after')", ["flaky"]),
        py(opts, "broken", "if not (root / 'fixed').exists(): print('broken'); sys.exit(5)"),
        py(opts, "needs_broken", "print('fine')", ["broken"]),
    ]


def killable(opts):
    """A smoke training, next to a longer one checkpointing every 50 of its 1000 steps, and a
    job after the long one."""
    short = grids.main_job(opts, "train", "smoke-short", "configs/smoke.py",
                           ["--config.train.progress=log"])
    long = grids.main_job(opts, "train", "smoke-long", "configs/smoke.py",
                          ["--config.train.steps=1000", "--config.train.checkpoint_every=50",
                           "--config.train.progress=log"])
    return [short, long, py(opts, "last", "print('last')", [long.name])]


def sleepy(opts):
    return [py(opts, "nap", "time.sleep(60)"), py(opts, "after_nap", "print(1)", ["nap"])]


def pinned(opts):
    return [py(opts, f"p{i}", "print(sorted(os.sched_getaffinity(0)), os.environ.get("
                              "'XLA_FLAGS', ''))") for i in range(2)]
'''


@pytest.fixture
def sweep_cli(tmp_path):
    """Runs `python -m launch.sweep ARGS` with the fake grids importable; returns a function."""
    (tmp_path / "fakegrid.py").write_text(FAKE_GRIDS)
    env = cli_env()
    env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{env['PYTHONPATH']}"
    root = tmp_path / "root"

    def run(*args, background=False, timeout=180):
        command = [sys.executable, "-m", "launch.sweep", *args, f"--root={root}"]
        if background:  # its own process group, so the test can kill it as a whole;
            # SIGINT handled as in a terminal even if pytest was started in the background
            return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True, preexec_fn=lambda: signal.signal(
                                        signal.SIGINT, signal.SIG_DFL))
        return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)

    run.root = root
    return run


def _states(root: pathlib.Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (root / ".sweep").glob("*.json")
            if p.name != "sweep.json"}


def _started(stdout: str) -> list[str]:
    """Job names of the `start` progress lines, in order."""
    return re.findall(r"\] start +\S+ +(\S+)", stdout)


def _table(stdout: str) -> dict[str, str]:
    """{job: status} from a status table (`status kind tries time job detail`)."""
    rows = {}
    for line in stdout.splitlines()[1:]:
        parts = line.split()
        if len(parts) < 5 or " of " in line and "jobs" in line:
            break
        rows[parts[4]] = parts[0]
    return rows


def _logs(root: pathlib.Path) -> list[str]:
    return sorted(p.name for p in (root / "logs").glob("*.log"))


def test_retry_blocked_and_skip_finished(sweep_cli):
    root = sweep_cli.root
    first = sweep_cli("run", "fakegrid:chain", "--retries=1")
    assert first.returncode == 1, first.stdout + first.stderr
    out = first.stdout
    # progress lines, then the summary with the failed job's logs
    assert "start    command  ok" in out and "done     command  ok" in out
    assert "failed   command  flaky  exit code 4" in out and "retrying" in out
    assert "FAILED   command  broken  exit code 5" in out and "giving up" in out
    assert "blocked  command  needs_broken  needs failed broken" in out
    assert f"{root}/logs/broken.1.log" in out and f"{root}/logs/broken.2.log" in out
    assert _logs(root) == ["after_flaky.1.log", "broken.1.log", "broken.2.log", "flaky.1.log",
                           "flaky.2.log", "ok.1.log"]
    assert "flaky fails" in (root / "logs" / "flaky.1.log").read_text()
    assert "# exit code 4" in (root / "logs" / "flaky.1.log").read_text()
    states = _states(root)
    assert states["broken"]["failures"] == 2 and states["broken"]["gave_up"]
    assert states["flaky"]["status"] == "succeeded" and states["flaky"]["attempt"] == 2

    status = sweep_cli("status", "fakegrid:chain")
    assert status.returncode == 1
    assert _table(status.stdout) == {"ok": "done", "flaky": "done", "after_flaky": "done",
                                     "broken": "failed", "needs_broken": "blocked"}

    # A second run starts nothing: done jobs are skipped, the failed one stays failed.
    again = sweep_cli("run", "fakegrid:chain", "--retries=1")
    assert again.returncode == 1 and "start " not in again.stdout
    assert "use `retry`" in again.stdout
    assert len(_logs(root)) == 6

    (root / "fixed").write_text("")
    retried = sweep_cli("retry", "fakegrid:chain")
    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert "reset the failure count of 1 job(s): broken" in retried.stdout
    assert _started(retried.stdout) == ["broken", "needs_broken"]
    assert {"broken.1.log", "broken.2.log", "broken.3.log"} <= set(_logs(root))  # logs kept
    assert sweep_cli("status", "fakegrid:chain").returncode == 0


def test_list_prints_jobs_and_command_lines(sweep_cli):
    listed = sweep_cli("list", "fakegrid:chain")
    assert listed.returncode == 0
    assert "needs_broken  [command]" in listed.stdout and "after: broken" in listed.stdout
    assert "$ python -c" in listed.stdout and "5 jobs" in listed.stdout
    only = sweep_cli("list", "fakegrid:chain", "--only=after_")
    assert "3 jobs" in only.stdout  # after_flaky and what it needs


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to pin jobs apart")
def test_threads_per_job_pins_parallel_jobs(sweep_cli):
    result = sweep_cli("run", "fakegrid:pinned", "--threads_per_job=1")
    assert result.returncode == 0, result.stdout
    assert "up to" in result.stdout and f"up to {len(os.sched_getaffinity(0))}" in result.stdout
    seen = []
    for i in range(2):
        text = (sweep_cli.root / "logs" / f"p{i}.1.log").read_text()
        line = next(x for x in text.splitlines() if x.startswith("["))
        seen.append(line.split("]")[0] + "]")
        assert "--xla_cpu_multi_thread_eigen=false" in line
    assert len(set(seen)) == 2 and all(len(json.loads(s)) == 1 for s in seen)


def test_ctrl_c_stops_the_jobs_and_leaves_them_resumable(sweep_cli):
    root = sweep_cli.root
    proc = sweep_cli("run", "fakegrid:sleepy", background=True)
    try:
        _wait_for(lambda: "nap" in _states(root), 60, "the job to start")
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == scheduler.EXIT_INTERRUPTED, out
    assert "interrupted: stopping running jobs" in out
    state = _states(root)["nap"]
    assert state["status"] == "interrupted" and not jobs.pid_alive(state["pid"])
    assert _table(sweep_cli("status", "fakegrid:sleepy").stdout) == {
        "nap": "pending", "after_nap": "pending"}


def _wait_for(predicate, timeout, what, poll=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_killed_sweep_resumes_only_what_is_missing(sweep_cli):
    """The key scenario: SIGKILL the driver's process group mid-sweep, check status, re-run."""
    root = sweep_cli.root
    proc = sweep_cli("run", "fakegrid:killable", "--max_parallel=2", background=True)
    try:
        names = {}

        def ready():
            names.update({_prefix(s): s for s in _states(root)})
            long = names.get("smoke-long")
            return (long is not None and "smoke-short" in names
                    and any((root / "runs" / long / "checkpoints").glob("step_????????")))

        # Half-way = the long run has a checkpoint; freeze it there (SIGSTOP), so that it
        # cannot finish before the kill however fast this machine trains.
        _wait_for(ready, 150, "the long run's first checkpoint", poll=0.05)
        short, long = names["smoke-short"], names["smoke-long"]
        long_pid = _states(root)[long]["pid"]
        os.kill(long_pid, signal.SIGSTOP)
        assert not (root / "runs" / long / "results.json").exists()
        _wait_for((root / "runs" / short / "results.json").exists, 150, "the short run")
        status = sweep_cli("status", "fakegrid:killable")
        assert _table(status.stdout) == {short: "done", long: "running", "last": "pending"}, \
            status.stdout
        busy = sweep_cli("run", "fakegrid:killable")
        assert busy.returncode == 2 and "another driver" in busy.stderr
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.stdout.close()
    # The driver's death took its job with it (no orphan writing into the workdir).
    _wait_for(lambda: not jobs.pid_alive(long_pid), 10, "the orphaned training to die")
    results = root / "runs" / short / "results.json"
    mtime = results.stat().st_mtime_ns

    status = sweep_cli("status", "fakegrid:killable")
    assert _table(status.stdout) == {short: "done", long: "pending", "last": "pending"}, \
        status.stdout
    assert "interrupted" in status.stdout

    again = sweep_cli("run", "fakegrid:killable")
    assert again.returncode == 0, again.stdout + again.stderr
    assert _started(again.stdout) == [long, "last"]
    assert results.stat().st_mtime_ns == mtime
    assert _states(root)[short]["attempt"] == 1
    assert not (root / "logs" / f"{short}.2.log").exists()
    assert "resuming from the checkpoint at step" in (
        root / "logs" / f"{long}.2.log").read_text()
    assert (root / "runs" / long / "results.json").exists()
    assert sweep_cli("status", "fakegrid:killable").returncode == 0


def test_status_before_any_run_is_all_pending(tmp_path):
    expanded = _embedded(tmp_path, smoke=True)
    rows = scheduler.sweep_status(expanded, tmp_path)
    assert {r.status for r in rows.values()} == {"pending"}


def test_a_backend_that_cannot_start_a_job_fails_it_with_the_reason(tmp_path):
    class Refusing:  # like sbatch refusing an unknown partition
        name, capacity, poll_interval_s = "local", 4, 0.01

        def start(self, items):
            raise RuntimeError("sbatch: error: invalid partition specified: nope")

    job = jobs.Job(name="j", kind="command", argv=("-c", ""), workdir=str(tmp_path),
                   done=(str(tmp_path / "never"),))
    after = dataclasses.replace(job, name="k", deps=("j",))
    out = io.StringIO()
    code = scheduler.Scheduler([job, after], tmp_path, Refusing(), retries=0, out=out).run()
    assert code == scheduler.EXIT_INCOMPLETE
    state = jobs.read_state(tmp_path, "j")
    assert state["status"] == "failed" and "invalid partition" in state["reason"]
    assert "invalid partition" in jobs.log_path(tmp_path, "j", 1).read_text()
    assert "blocked  command  k" in out.getvalue()


def test_local_backend_defaults_per_grid_and_shared_compile_cache(tmp_path, monkeypatch):
    from launch import sweep
    from launch.local import LocalBackend

    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setattr(LocalBackend, "__init__", lambda self, max_parallel, threads, env:
                        self.__dict__.update(max_parallel=max_parallel, threads=threads, env=env))
    parse = sweep._parser().parse_args
    embedded = sweep.make_backend(parse(["run", "embedded"]), tmp_path)
    assert embedded.threads == grids.LOCAL_THREADS_PER_JOB["embedded"] == 1
    assert embedded.env["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / ".sweep" / "jax_cache")
    assert sweep.make_backend(parse(["run", "sec22"]), tmp_path).threads is None
    assert sweep.make_backend(parse(["run", "embedded", "--threads_per_job=0"]),
                              tmp_path).threads is None
    assert sweep.make_backend(parse(["run", "sec22", "--threads_per_job=2"]),
                              tmp_path).threads == 2
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))
    assert sweep.make_backend(parse(["run", "embedded"]), tmp_path).env == {}

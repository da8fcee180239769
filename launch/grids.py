"""The named sweeps: each a function from `GridOptions` to a list of `jobs.Job`.

  embedded   the README's main command: Fashion-MNIST (Debian's package), a "-C" set, dense
             and six compressed Conv-4s, two CARDs and their deck, Fourier heat maps, a report
  sec22      configs/paper_sec22.py: models x methods x sparsities on CIFAR-10 (Figure 1)
  sec33      configs/paper_sec33.py on CIFAR-10: models x augmentations x methods x sparsities,
             plus 2/4/6-card decks of AugMix + Gaussian CARDs per model/method/sparsity
  cifar100   the same on CIFAR-100 (the paper's CIFAR-100 subset: wrn18_2; lth, lrr, ep, bp)

`smoke=True` gives the same structure with the configs' seconds-long synthetic variants.
Another grid can be named as `package.module:function` (same signature).

Run workdirs are `ROOT/runs/<prefix>-<hash>`, the hash taken over the run's resolved config
(`jobs.stable_name`): adding a grid point never renames another, changing a run's config (a knob
here, or a default in its config file) gives it a new workdir.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import os
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

from launch import jobs as jobs_lib
from launch.jobs import Job


@dataclasses.dataclass(frozen=True)
class GridOptions:
    """What every grid is given.

    Attributes:
      root: the sweep's folder (absolute); runs, logs and state go under it.
      data_dir: `data.dir` for every run ('' = each dataset's default location).
      corruption_dir: paper grids: a released "-C" folder (CIFAR-10-C / CIFAR-100-C) to evaluate
        on; '' = generate one from the local test split with a `corrupt` job into ROOT.
      smoke: seconds-long synthetic variants with the same structure (tests).
    """

    root: pathlib.Path
    data_dir: str = ""
    corruption_dir: str = ""
    smoke: bool = False


def default_root(name: str, smoke: bool) -> str:
    return f"workdirs/{name.replace(':', '_').replace('.', '_')}{'_smoke' if smoke else ''}"


# ----------------------------------------------------------------------------------------------
# Job builders shared by the grids
# ----------------------------------------------------------------------------------------------


def resolve_config(spec: str, overrides: Sequence[str]):
    """The config `card_jax.main` would run: the file's `get_config(arg)` plus the overrides,
    checked the same way (unknown keys and wrong types fail here, at expansion time)."""
    from card_jax import config_util  # imports JAX through configs/common.py: only when needed

    path, sep, arg = spec.partition(":")
    config = config_util.load_config_file(str(jobs_lib.REPO / path) + sep + arg)
    config_util.apply_overrides(config, list(overrides))
    return config


@functools.lru_cache(maxsize=None)
def resolved_dict(spec: str, overrides: tuple[str, ...]) -> dict:
    """`resolve_config` as a plain dict, cached: a grid resolves each run once, and a level-0
    source once for all the runs that copy from it. Callers must not modify it."""
    from card_jax import config_util

    return config_util.to_dict(resolve_config(spec, overrides))


def main_job(opts: GridOptions, kind: str, prefix: str, spec: str, overrides: Sequence[str],
             deps: Sequence[str] = (), folder: str = "runs",
             check: Callable[[dict], None] | None = None) -> Job:
    """A `python -m card_jax.main` job (a training run or a deck), named by its resolved config.

    Done when `W/results.json` exists: card_jax writes it last. `check(resolved config dict)`,
    if given, may refuse the job by raising.
    """
    from card_jax import config_util

    overrides = list(overrides)
    if opts.data_dir and kind == "train":
        overrides.append(f"--config.data.dir={opts.data_dir}")
    config = resolved_dict(spec, tuple(overrides))
    if check is not None:
        check(config)
    prefix = prefix.format(model=config["model"]["name"]) if "model" in config else prefix
    # Keys added later are left out at their old value, so an existing sweep keeps its names.
    named = config_util.without_added_defaults(config)
    name = jobs_lib.stable_name(prefix, {"kind": kind, "config": named}, opts.root)
    workdir = opts.root / folder / name
    argv = ("-m", "card_jax.main", f"--config={spec}", f"--workdir={workdir}", *overrides)
    return Job(name=name, kind=kind, argv=argv, workdir=str(workdir),
               done=(str(workdir / "results.json"),), deps=tuple(deps))


def corrupt_job(opts: GridOptions, dataset: str, out: pathlib.Path, examples: int = -1,
                corruptions: str = "all") -> Job:
    """`python -m card_jax.corrupt`: done when every file it writes exists (each appears by
    rename once complete; info.json alone is written first, so it proves nothing)."""
    from card_jax.data import corruption_sets  # numpy only

    argv = ["-m", "card_jax.corrupt", f"--dataset={dataset}", f"--out={out}",
            f"--examples={examples}", "--progress=log"]
    if corruptions != "all":
        argv.append(f"--corruptions={corruptions}")
    if opts.data_dir:
        argv.append(f"--data_dir={opts.data_dir}")
    names = corruption_sets.resolve_corruptions(corruptions)
    done = [str(out / f"{c}.npy") for c in names] + [str(out / corruption_sets.LABELS_FILE),
                                                     str(out / corruption_sets.INFO_FILE)]
    checks = (((str(out / corruption_sets.INFO_FILE), "n_examples", examples),)
              if examples > 0 else ())
    name = jobs_lib.stable_name(f"corrupt-{dataset}", argv, opts.root)
    return Job(name=name, kind="corrupt", argv=tuple(argv), workdir=str(out), done=tuple(done),
               done_json=checks)


def heatmap_job(opts: GridOptions, run: Job, eps: Sequence[float], examples: int,
                baseline: Job | None = None, baseline_heatmap: Job | None = None) -> Job:
    """`python -m card_jax.heatmaps` into `W/heatmaps`; done when its heatmap.json records these
    settings (one made with other eps/examples is stale). With a baseline whose own heat map job
    is given, that job runs first so the baseline's maps are read, not recomputed."""
    argv = ["-m", "card_jax.heatmaps", f"--workdir={run.workdir}"]
    if baseline is not None:
        argv.append(f"--baseline={baseline.workdir}")
    argv += [f"--eps={','.join(f'{e:g}' for e in eps)}", f"--examples={examples}"]
    meta = str(pathlib.Path(run.workdir) / "heatmaps" / "heatmap.json")
    deps = [run.name] + [j.name for j in (baseline, baseline_heatmap) if j is not None]
    prefix = run.name.rpartition("-")[0]  # the run's readable part
    return Job(name=jobs_lib.stable_name(f"heatmap-{prefix}", argv, opts.root), kind="heatmap",
               argv=tuple(argv), workdir=str(pathlib.Path(run.workdir) / "heatmaps"),
               done=(meta,), deps=tuple(deps),
               done_json=((meta, "eps", [float(e) for e in eps]), (meta, "examples", examples)))


def report_job(opts: GridOptions, others: Sequence[Job]) -> Job:
    """`python -m card_jax.report` over the whole root, after every other job."""
    out = opts.root / "report"
    argv = ("-m", "card_jax.report", f"--runs={opts.root}", f"--out={out}")
    return Job(name=jobs_lib.stable_name("report", argv, opts.root), kind="report", argv=argv,
               workdir=str(out), done=(str(out / "report.md"),),
               deps=tuple(j.name for j in others))


def deck_members(augmix: Job, gaussian: Job, cards: int, realizations: int) -> str:
    """`deck.members` for a deck of `cards` cards, half AugMix and half Gaussian: whole runs
    when a run's R realizations are exactly half the deck, else `DIR:r` for r < cards/2."""
    half = cards // 2
    if cards % 2 or not 1 <= half <= realizations:
        raise ValueError(f"a {cards}-card deck needs {half} of {realizations} realizations per "
                         "augmentation")
    if half == realizations:
        return f"{augmix.workdir},{gaussian.workdir}"
    return ",".join(f"{run.workdir}:{r}" for run in (augmix, gaussian) for r in range(half))


# Methods whose level 0 is dense training (`pruning.Method.dense_level0`, which a test checks
# against this list): they can copy it from a finished dense run instead of training it
# (`method.level0_from`, card_jax/level0.py).
LEVEL0_IS_DENSE = ("ft", "lth", "lrr")


# Paper grids: the dense runs with the LTH recipe that stand in for level 0 (LEVEL0_IS_DENSE)
# go here. The report skips folders of this name (card_jax.report.collect.SKIP_DIRS): their
# recipe is not the paper's dense baseline, which they would otherwise join.
LEVEL0_FOLDER = "level0"


def level0_source(opts: GridOptions, spec: str, prefix: str) -> Job:
    """A dense run of `spec` (a paper config's LEVEL0_SOURCE) in LEVEL0_FOLDER: evaluated on
    the clean test set only, since only its trained state is used."""
    return main_job(opts, "train", prefix, spec, [], folder=LEVEL0_FOLDER)


def shared_level0_job(opts: GridOptions, prefix: str, spec: str, overrides: Sequence[str],
                      deps: Sequence[str], source: Job) -> Job:
    """A LEVEL0_IS_DENSE run that copies its level 0 from `source` (`method.level0_from`).

    Checked here, at expansion, with the test card_jax applies when the run starts
    (`level0.training_differences`): a config edit that makes the two trainings differ fails
    now, not after the source has trained.
    """
    from card_jax import level0

    source_spec = next(a.split("=", 1)[1] for a in source.argv if a.startswith("--config="))
    source_config = resolved_dict(
        source_spec, tuple(a for a in source.argv if a.startswith("--config.")))

    def same_level0(config: dict) -> None:
        changes = level0.training_differences(source_config, config)
        if changes:
            raise ValueError(f"{spec}: its level 0 is not the training of the run it would copy "
                             f"level 0 from ({source.name}); differences (source -> run):\n  "
                             + "\n  ".join(changes))

    return main_job(opts, "train", prefix, spec,
                    [*overrides, f"--config.method.level0_from={source.workdir}"],
                    [*deps, source.name], check=same_level0)


# ----------------------------------------------------------------------------------------------
# embedded: the README's main command
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EmbeddedKnobs:
    """Every number of the embedded sweep, in one place.

    Training dominates: dense, gmp, ep, bp train `epochs` once; ft, lth and lrr copy their
    level 0 from the dense run (`share_dense_level0`) and train 0.25, 1 and 1 more times;
    both CARDs (lrr by default) train `1 + lth_levels` times. Measured with these defaults on
    a quiet 2-core machine, two jobs side by side on one CPU each (~4.1 steps/s of R=2 per
    job): 9:21 in all; a one-training run 1:22-1:49 (~1:00 training, ~0:25 evaluating the
    clean set and 95 "-C" cells of 500 images), lth/lrr 1:28/1:23, ft 0:46, the CARDs
    2:36/2:50, the deck 1:03, each heat map job 0:26-0:29, the "-C" set 0:18, the report 1 s.
    """

    # The base config of every run; CARDs use its `:augmix` / `:gaussian` variants.
    config: str = "configs/default.py"
    # Length of every training (and of every LTH/LRR level), in epochs. EP/BP's warm-up must
    # end before it ends: see ep_bp_warmup_epochs.
    epochs: float = 0.5
    # Compressed runs: the methods next to dense, their sparsity and scope.
    methods: tuple[str, ...] = ("ft", "gmp", "lth", "lrr", "ep", "bp")
    sparsity: float = 0.8
    scope: str = "global"
    # lth/lrr: pruning levels to reach `sparsity` (each one more training of `epochs`).
    lth_levels: int = 1
    # ep/bp: global sparsity warm-up from 50%, in epochs. card_jax counts it in whole epochs
    # (rounded up) and refuses a warm-up that does not end before training does, so it must
    # be 0 (start at `sparsity`) or at most epochs - 1 (e.g. 1 with epochs=2, as
    # configs/default.py does).
    ep_bp_warmup_epochs: float = 0.0
    # gmp: steps between mask updates (card_jax's default of 100 would prune in only ~2
    # jumps over a half-epoch run of 234 steps).
    gmp_frequency: int = 20
    # The two CARDs (one AugMix, one Gaussian run; their R=2 realizations give 2 + 2 cards) and
    # so the deck: method and sparsity.
    deck_method: str = "lrr"
    deck_sparsity: float = 0.8
    # Fashion-MNIST-C: test images per cell written by `card_jax.corrupt` and evaluated per
    # run (19 corruptions x 5 severities x this).
    corruption_examples: int = 500
    # Fourier heat maps of dense and the two CARDs: test images and perturbation norms
    # (each eps costs H x W / 2 evaluations of every image).
    heatmap_examples: int = 100
    heatmap_eps: tuple[float, ...] = (4.0,)
    # The deck's config file (its `:smoke` variant samples fewer gate representatives).
    deck_config: str = "configs/deck.py"
    # Appended to every training run's overrides (e.g. ("--config.train.realizations=3",)).
    extra_overrides: tuple[str, ...] = ()
    # ft/lth/lrr take their level 0 (dense training, bit for bit the dense run) from the dense
    # run (`method.level0_from`) instead of training it three more times.
    share_dense_level0: bool = True


# The structure of the embedded sweep in seconds per job, for tests: 20-step runs on 2,560
# images, small "-C" cells and heat maps.
EMBEDDED_SMOKE = EmbeddedKnobs(config="configs/default.py:smoke", corruption_examples=50,
                               heatmap_examples=10, heatmap_eps=(4.0,),
                               deck_config="configs/deck.py:smoke")


def embedded(opts: GridOptions, knobs: EmbeddedKnobs | None = None) -> list[Job]:
    """The README sweep on Fashion-MNIST (see EmbeddedKnobs for every number)."""
    k = knobs or (EMBEDDED_SMOKE if opts.smoke else EmbeddedKnobs())
    if (any(m in ("ep", "bp") for m in k.methods) and k.ep_bp_warmup_epochs != 0
            and not 0 < math.ceil(k.ep_bp_warmup_epochs) < k.epochs):
        raise ValueError(f"ep_bp_warmup_epochs={k.ep_bp_warmup_epochs}: card_jax rounds the "
                         f"warm-up up to whole epochs and it must end before epochs={k.epochs}; "
                         "use 0 or at most epochs - 1")
    cdir = opts.root / "fashion_mnist_c"
    corrupt = corrupt_job(opts, "fashion_mnist", cdir, k.corruption_examples)
    common = [f"--config.train.epochs={k.epochs:g}", f"--config.eval.corruption_dir={cdir}",
              f"--config.eval.corruption_examples={k.corruption_examples}",
              "--config.eval.extra_corruptions=True", *k.extra_overrides]

    def method_overrides(method: str, sparsity: float) -> list[str]:
        if method == "dense":
            return ["--config.method.name=dense"]
        out = [f"--config.method.name={method}", f"--config.method.sparsity={sparsity:g}",
               f"--config.method.scope={k.scope}"]
        if method in ("lth", "lrr"):
            out.append(f"--config.method.levels={k.lth_levels}")
        if method == "gmp":
            out.append(f"--config.method.frequency={k.gmp_frequency}")
        if method in ("ep", "bp"):
            out.append(f"--config.method.warmup_epochs={k.ep_bp_warmup_epochs:g}")
        return out

    runs: dict[str, Job] = {}
    for method in ("dense", *k.methods):
        prefix = "{model}-dense" if method == "dense" else f"{{model}}-{method}-{k.sparsity:g}"
        overrides, deps = method_overrides(method, k.sparsity) + common, [corrupt.name]
        if method in LEVEL0_IS_DENSE and k.share_dense_level0:
            # Their level 0 is this very dense training: copy it, do not train it again.
            runs[method] = shared_level0_job(opts, prefix, k.config, overrides, deps,
                                             runs["dense"])
        else:
            runs[method] = main_job(opts, "train", prefix, k.config, overrides, deps)
    cards = {}
    for aug in ("augmix", "gaussian"):
        if opts.smoke:  # configs/default.py takes one argument: smoke, augmix or gaussian
            spec, aug_overrides = k.config, [f"--config.data.augment={aug}"]
        else:
            spec, aug_overrides = f"{k.config.partition(':')[0]}:{aug}", []
        overrides = (method_overrides(k.deck_method, k.deck_sparsity) + common + aug_overrides
                     + ["--config.eval.generate_corruptions=False"])
        cards[aug] = main_job(opts, "train", f"{{model}}-{k.deck_method}-{k.deck_sparsity:g}-{aug}",
                              spec, overrides, [corrupt.name])
    deck = main_job(opts, "deck", f"deck-{k.deck_method}-{k.deck_sparsity:g}",
                    k.deck_config,
                    [f"--config.deck.members={cards['augmix'].workdir},{cards['gaussian'].workdir}",
                     f"--config.eval.corruption_dir={cdir}"],
                    [cards["augmix"].name, cards["gaussian"].name], folder="decks")
    dense_map = heatmap_job(opts, runs["dense"], k.heatmap_eps, k.heatmap_examples)
    maps = [dense_map] + [
        heatmap_job(opts, cards[aug], k.heatmap_eps, k.heatmap_examples, runs["dense"],
                    dense_map)
        for aug in ("augmix", "gaussian")]
    # The scheduler starts ready jobs in list order. The two-training CARD runs (the deck's
    # inputs) go first, then dense (ft/lth/lrr wait for it), then the longest remaining runs,
    # so that no long job ends up alone on one core at the end while the other core idles.
    order = sorted(runs, key=lambda m: (m != "dense", m in LEVEL0_IS_DENSE, m == "ft"))
    everything = [corrupt, *cards.values(), *(runs[m] for m in order), deck, *maps]
    return everything + [report_job(opts, everything)]


# ----------------------------------------------------------------------------------------------
# The paper's grids
# ----------------------------------------------------------------------------------------------


def _corruption_source(opts: GridOptions, dataset: str) -> tuple[list[str], list[Job]]:
    """Eval overrides for the "-C" set of `dataset`, and the job that makes it if needed.

    Smoke runs skip corruption evaluation: their synthetic 16x16 images have no "-C" set.
    """
    if opts.smoke:
        return [], []
    if opts.corruption_dir:
        return [f"--config.eval.corruption_dir={opts.corruption_dir}"], []
    out = opts.root / f"{dataset}_c"
    job = corrupt_job(opts, dataset, out, corruptions="benchmark")
    return [f"--config.eval.corruption_dir={out}"], [job]


def _config_module(name: str):
    """A module of configs/ (its grid axes), importable from any working directory."""
    if str(jobs_lib.REPO) not in sys.path:
        sys.path.insert(0, str(jobs_lib.REPO))
    return importlib.import_module(f"configs.{name}")


def _arg(*parts: Any, smoke: bool) -> str:
    return ",".join([str(p) for p in parts] + (["smoke"] if smoke else []))


def sec22(opts: GridOptions) -> list[Job]:
    """Section 2.2 (Figure 1): every model x method x sparsity of configs/paper_sec22.py.

    The 15 ft/lth/lrr runs of a model (5 sparsities) share one level 0, trained once by a
    `dense_openlth` run; bit for bit what each would have trained itself.
    """
    paper = _config_module("paper_sec22")

    eval_overrides, corrupt = _corruption_source(opts, "cifar10")
    deps = [j.name for j in corrupt]
    sources, runs = [], []
    for model in paper.MODELS:
        source = level0_source(
            opts, f"configs/paper_sec22.py:{_arg(model, paper.LEVEL0_SOURCE, smoke=opts.smoke)}",
            f"{model}-{paper.LEVEL0_SOURCE}")
        sources.append(source)
        for method in paper.METHODS:
            for sparsity in (None,) if method == "dense" else paper.SPARSITIES:
                arg = _arg(model, method, *([sparsity] if sparsity else []), smoke=opts.smoke)
                prefix = f"{model}-{method}" + (f"-{sparsity:g}" if sparsity else "")
                spec = f"configs/paper_sec22.py:{arg}"
                runs.append(
                    shared_level0_job(opts, prefix, spec, eval_overrides, deps, source)
                    if method in LEVEL0_IS_DENSE else
                    main_job(opts, "train", prefix, spec, eval_overrides, deps))
    everything = corrupt + sources + runs
    return everything + [report_job(opts, everything)]


DECK_SIZES = (2, 4, 6)


def sec33(opts: GridOptions, dataset: str = "cifar10") -> list[Job]:
    """Section 3.3 (Figure 4): configs/paper_sec33.py's grid for `dataset`, and CARD-Decks.

    The lth/lrr runs of a (model, augmentation) share one level 0 (a `dense_openlth` run),
    as in sec22. A deck of n cards takes n/2 realizations of the AugMix run and of the
    Gaussian run of one (model, method, sparsity); dense runs make no decks.
    """
    paper = _config_module("paper_sec33")

    eval_overrides, corrupt = _corruption_source(opts, dataset)
    deps = [j.name for j in corrupt]
    models = tuple(paper.MODELS) if dataset == "cifar10" else ("wrn18_2",)
    methods = paper.METHODS if dataset == "cifar10" else paper.CIFAR100_METHODS
    runs: dict[tuple, Job] = {}
    sources = []
    for model in models:
        for aug in paper.AUGMENTATIONS:
            source = level0_source(opts, "configs/paper_sec33.py:" + _arg(
                dataset, model, aug, paper.LEVEL0_SOURCE, smoke=opts.smoke),
                f"{model}-{paper.LEVEL0_SOURCE}-{aug}")
            sources.append(source)
            for method in methods:
                for sparsity in (None,) if method == "dense" else paper.SPARSITIES:
                    arg = _arg(dataset, model, aug, method,
                               *([sparsity] if sparsity else []), smoke=opts.smoke)
                    prefix = f"{model}-{method}" + (f"-{sparsity:g}" if sparsity else "") + \
                        f"-{aug}"
                    spec = f"configs/paper_sec33.py:{arg}"
                    runs[model, aug, method, sparsity] = (
                        shared_level0_job(opts, prefix, spec, eval_overrides, deps, source)
                        if method in LEVEL0_IS_DENSE else
                        main_job(opts, "train", prefix, spec, eval_overrides, deps))
    decks = []
    deck_spec = "configs/deck.py:smoke" if opts.smoke else "configs/deck.py"
    for (model, aug, method, sparsity), augmix in runs.items():
        if aug != "augmix" or method == "dense":
            continue
        gaussian = runs[model, "gaussian", method, sparsity]
        realizations = 2 if opts.smoke else 3  # paper_sec33: R=3; shrink_for_smoke: R=2
        for cards in DECK_SIZES:
            if cards // 2 > realizations:
                continue
            decks.append(main_job(
                opts, "deck", f"deck-{model}-{method}-{sparsity:g}-{cards}cards", deck_spec,
                [f"--config.deck.members={deck_members(augmix, gaussian, cards, realizations)}",
                 *eval_overrides], [augmix.name, gaussian.name], folder="decks"))
    everything = corrupt + sources + list(runs.values()) + decks
    return everything + [report_job(opts, everything)]


def cifar100(opts: GridOptions) -> list[Job]:
    """Section 3.3 on CIFAR-100: wrn18_2 x augmentations x (dense, lth, lrr, ep, bp), decks."""
    return sec33(opts, "cifar100")


GRIDS: dict[str, Callable[[GridOptions], list[Job]]] = {
    "embedded": embedded, "sec22": sec22, "sec33": sec33, "cifar100": cifar100}

# The local backend's CPUs per job when --threads_per_job is not given (absent: all CPUs, one
# job at a time). The embedded sweep's quarter-width Conv-4 steps are too small to keep two
# cores busy: two such jobs side by side, each pinned to one CPU, trained 1.28x faster in all
# than one job on both (measured on 2 cores: 150 steps of R=2, 4.51 steps/s alone vs 2 x 2.88
# steps/s side by side). The paper grids train full-width models: one job, every core.
LOCAL_THREADS_PER_JOB: dict[str, int] = {"embedded": 1}


def load_grid(name: str) -> Callable[[GridOptions], list[Job]]:
    """A grid by name, or any `package.module:function` taking GridOptions."""
    if name in GRIDS:
        return GRIDS[name]
    module, sep, attr = name.partition(":")
    if not sep:
        raise ValueError(f"unknown grid {name!r}: use one of {', '.join(GRIDS)} or "
                         "package.module:function")
    return getattr(importlib.import_module(module), attr)


def expand(name: str, opts: GridOptions) -> list[Job]:
    """The grid's jobs, checked (unique names, known deps, no cycle) and in dependency order."""
    if not opts.root.is_absolute():
        opts = dataclasses.replace(opts, root=pathlib.Path(os.path.abspath(opts.root)))
    return jobs_lib.check_graph(load_grid(name)(opts))

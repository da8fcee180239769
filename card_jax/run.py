"""The level loop and the results of a run (open_lth's runner; DESIGN §3 `run.py`).

dense, GMP, EP and BP train one level. FT trains two (dense, then one-shot prune and
fine-tune), LTH and LRR one per pruning level: each level >= 1 starts from
`method.prune(previous final params, ..., rewind params, level)` with a fresh optimizer and
its step counter (hence LR schedule and batch order) at `method.level_start_step`.

Workdir layout: single-level runs keep `checkpoints/` at the top; multi-level runs keep
`levels/level_<k>/{checkpoints,results.json}` (level 0 of LTH also `rewind/`). The final
`results.json` at the top is written last and marks the run complete.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import card_jax
from card_jax import checkpoint as checkpoint_lib
from card_jax import config_util, evaluate, level0, packing, pruning, realizations, steps, train
from card_jax import state as state_lib
from card_jax import writer as writer_lib
from card_jax.pruning import masks, memory

log = logging.getLogger("card_jax")

RESULTS_FILE = "results.json"
CONFIG_FILE = "config.json"


class ConfigMismatchError(ValueError):
    """The workdir holds a run of a different config."""


def package_versions() -> dict[str, str]:
    import flax
    import optax

    return {"card_jax": card_jax.__version__, "jax": jax.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "orbax-checkpoint": checkpoint_lib.ORBAX_VERSION,
            "numpy": np.__version__}


def level_dir(workdir: pathlib.Path, level: int, levels: int) -> pathlib.Path:
    return workdir if levels == 1 else workdir / "levels" / f"level_{level}"


def _write_json(path: pathlib.Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


VOLATILE_PREFIXES = config_util.VOLATILE_PREFIXES


def _check_config(workdir: pathlib.Path, config) -> bool:
    """Writes config.json, or checks that an existing run in `workdir` has the same config.

    Returns True if only volatile keys (VOLATILE_PREFIXES) changed, which invalidates the
    results but not the checkpoints.
    """
    path = workdir / CONFIG_FILE
    new = config_util.to_dict(config)
    existed = path.exists()
    if existed:
        old = config_util.with_added_keys(json.loads(path.read_text(encoding="utf-8")))
        changes = config_util.diff(old, new)
        fixed = [c for c in changes if not c.startswith(VOLATILE_PREFIXES)]
        if fixed:
            raise ConfigMismatchError(
                f"{workdir} already holds a run with a different config; use a new --workdir "
                "or the same config. Differences (saved -> requested):\n  " + "\n  ".join(fixed))
        if not changes:
            return False
        log.info("evaluation settings changed (%s): re-evaluating from the checkpoints",
                 "; ".join(changes))
    if jax.process_index() == 0:
        _write_json(path, new)
    return existed


def _per_realization(tree, count: int) -> list:
    return [state_lib.index(tree, r) for r in range(count)]


def compression_report(exp: train.Experiment, host_state) -> dict:
    """Per-realization sparsity, surviving weights and memory (SPEC §9) from a host state."""
    R = exp.config.train.realizations
    apply = jax.jit(exp.method.apply)
    report = {"num_params": [], "sparsity_global": [], "sparsity_per_layer": [],
              "memory_mb": []}
    for params, ms in zip(_per_realization(host_state.params, R),
                          _per_realization(host_state.method_state, R)):
        effective = realizations.to_host(apply(params, ms))
        prunable = masks.prunable_tree(effective)
        nonzero = jax.tree.map(lambda x: np.asarray(x) != 0, effective)
        sparsity = masks.sparsity_report(nonzero, prunable)
        kept = int(sum(np.count_nonzero(x) for x, f in
                       zip(jax.tree.leaves(effective), jax.tree.leaves(prunable)) if f))
        report["num_params"].append(kept)
        report["sparsity_global"].append(sparsity["global"])
        report["sparsity_per_layer"].append(sparsity["per_layer"])
        report["memory_mb"].append(memory.memory_mb(effective, prunable, exp.method.binary))
    return report


def _prune_all(exp: train.Experiment, host_state, rewind_params, plan: train.LevelPlan):
    """Level boundary for every realization: prune, rewind, fresh optimizer, step counter."""
    R = exp.config.train.realizations
    prune = jax.jit(exp.method.prune, static_argnums=3)
    init_opt = jax.jit(lambda p, ms: exp.tx.init(pruning.get_trainable(exp.method, p, ms)))
    states = []
    for r in range(R):
        st = state_lib.index(host_state, r)
        rewind = None if rewind_params is None else state_lib.index(rewind_params, r)
        params, ms = prune(st.params, st.method_state, rewind, plan.index)
        states.append(st._replace(params=params, method_state=ms,
                                  opt_state=init_opt(params, ms), step=jnp.int32(plan.start),
                                  first_bad_step=jnp.int32(-1)))
    return realizations.to_host(state_lib.stack(states))


def _level0_source(exp: train.Experiment, config) -> pathlib.Path | None:
    """The checked dense run that stands in for level 0 (`method.level0_from`), or None."""
    source = config.method.get("level0_from", "")
    if not source:
        return None
    if not exp.method.dense_level0 or len(exp.levels) < 2:
        raise level0.Level0SourceError(
            f"method.level0_from is for methods whose level 0 is dense training (ft, lth, lrr); "
            f"{config.method.name!r} does not have one")
    path = pathlib.Path(source).resolve()
    level0.check_source(path, config_util.to_dict(config), config_file=CONFIG_FILE,
                        results_file=RESULTS_FILE)
    return path


def _recalibrate_batch_norm(exp, compiled, state, data, batches: int):
    """EP/BP option: re-estimate BN running statistics with `batches` train-mode forward
    passes (no gradients) after resetting them; the weights are untouched."""
    cfg = exp.config
    spec = steps.BatchSpec(cfg.train.batch_size, len(exp.dataset.train_images), cfg.data.seed,
                           0, False)
    step = jax.jit(realizations.over_realizations(
        steps.make_bn_step(exp.graphdef, exp.method, spec), compiled.strategy, num_shared=3))
    reset = jax.tree.map(lambda x: jnp.zeros_like(x), state.batch_stats)
    reset = jax.tree.map_with_path(
        lambda path, x: jnp.ones_like(x) if masks.path_str(path).endswith("var") else x, reset)
    state = state._replace(batch_stats=reset)
    for i in range(batches):
        state = step(state, data[0], data[1], jnp.int32(i))
    return state


def _prepare_corruptions(config) -> None:
    """Checks (and with eval.generate_corruptions first writes) the "-C" evaluation set."""
    from card_jax.data import corruption_sets

    names = corruption_sets.CORRUPTIONS + (
        corruption_sets.EXTRA_CORRUPTIONS if config.eval.extra_corruptions else ())
    if config.eval.generate_corruptions:
        from card_jax import corrupt

        examples = config.data.test_examples
        corrupt.generate(config.data.name, config.eval.corruption_dir, config.data.dir,
                         corruptions=list(names), examples=examples,
                         progress=config.train.progress,
                         synthetic=train.synthetic_options(config.data))
    corruption_sets.open_folder(config.eval.corruption_dir, names)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Trains every level of the configured method for R realizations; returns results.json."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    reevaluate = _check_config(workdir, config)
    results_path = workdir / RESULTS_FILE
    if results_path.exists() and not reevaluate:
        log.info("%s is complete (results.json exists); nothing to do", workdir)
        return json.loads(results_path.read_text(encoding="utf-8"))

    if config.eval.corruption_dir:  # fail now, not after training, if the files are missing
        _prepare_corruptions(config)
    exp = train.build_experiment(config)
    R = config.train.realizations
    num_levels = len(exp.levels)
    is_main = jax.process_index() == 0
    writer = writer_lib.MetricWriter(workdir, tensorboard=True) if is_main else None
    metadata = {"config": config_util.to_dict(config), "versions": package_versions(),
                "workdir_format_version": card_jax.FORMAT_VERSION,
                "dataset": train.dataset_info(exp.dataset),
                "realization_seeds": train.realization_seeds(config)}
    level0_source = _level0_source(exp, config)
    compiled_by_plan: dict[tuple, train.CompiledSteps] = {}

    def compiled_for(plan):
        method = train.level_method(exp, plan)
        key = (id(plan.lr_fn), method.name)
        if key not in compiled_by_plan:
            compiled_by_plan[key] = train.CompiledSteps(exp, plan.lr_fn, method)
        return compiled_by_plan[key]

    first = compiled_for(exp.levels[0])
    data = first.place_data(exp.dataset.train_images, exp.dataset.train_labels.astype(np.int32),
                            exp.dataset.test_images, exp.dataset.test_labels.astype(np.int32))
    log.info("training %s/%s (%d level(s)), R=%d, %d steps per level (%d per epoch), "
             "strategy=%s on %d device(s)", config.model.name, config.method.name, num_levels,
             R, exp.total_steps, exp.steps_per_epoch, first.strategy, jax.device_count())

    host_state, rewind_params, levels_summary, wall_total = exp.state, None, [], 0.0
    state = None
    try:
        for plan in exp.levels:
            directory = level_dir(workdir, plan.index, num_levels)
            compiled = compiled_for(plan)
            if writer:
                writer.level = plan.index
            if plan.index > 0:
                if exp.method.rewind_step is not None and rewind_params is None:
                    rewind_dir = level_dir(workdir, 0, num_levels) / "rewind"
                    restored = checkpoint_lib.Checkpointer(rewind_dir).restore_latest(
                        train.abstract_of(exp.state.params))
                    if restored is None:
                        raise checkpoint_lib.CheckpointError(f"no rewind weights in {rewind_dir}")
                    rewind_params = restored[1]
                host_state = _prune_all(exp, host_state, rewind_params, plan)
            elif level0_source is not None:
                level0.import_final_state(
                    level_dir(level0_source, 0, 1) / "checkpoints", directory, host_state,
                    plan.end, exp.method.rewind_step, metadata,
                    keep=config.train.keep_checkpoints)
            ctx = train.LevelContext(directory=directory, writer=writer,
                                     metadata=metadata,
                                     progress_mode=config.train.progress if is_main else "none")
            state, wall = train.train_level(exp, plan, compiled, host_state, ctx, data)
            wall_total += wall
            host_state = realizations.to_host(state)
            if num_levels > 1:
                acc = None
                if plan.index == 0 and level0_source is not None:  # copied: so is its accuracy
                    acc = level0.source_clean_accuracy(
                        level0_source, config_util.to_dict(config), config_file=CONFIG_FILE,
                        results_file=RESULTS_FILE)
                if acc is None:
                    acc = train.evaluate(compiled, state, data[2], data[3],
                                         config.eval.batch_size)
                acc = np.asarray(acc)
                report = compression_report(exp, host_state)
                summary = {"level": plan.index, "clean_acc": [float(a) for a in acc],
                           "sparsity_global": report["sparsity_global"],
                           "num_params": report["num_params"], "wall_time_s": wall}
                if plan.index == 0 and level0_source is not None:
                    summary["level0_from"] = str(level0_source)
                levels_summary.append(summary)
                if writer:
                    writer.write_scalars(plan.end, {"accuracy": acc}, split="test")
                if is_main:
                    _write_json(directory / RESULTS_FILE, summary)
                log.info("level %d done: sparsity %s, clean accuracy %s", plan.index,
                         train.format_values(report["sparsity_global"]),
                         train.format_values(acc))
        final_plan = exp.levels[-1]
        compiled = compiled_for(final_plan)
        recalibrate = config.method.bn_recalibration_batches
        if recalibrate > 0:
            state = _recalibrate_batch_norm(exp, compiled, state, data, recalibrate)
            host_state = realizations.to_host(state)
            # Re-save the final step so export and decks see the recalibrated statistics.
            final_dir = level_dir(workdir, final_plan.index, num_levels) / "checkpoints"
            checkpoint_lib.Checkpointer(final_dir, keep=config.train.keep_checkpoints).save(
                final_plan.end, state, {**metadata, "level": final_plan.index,
                                        "wall_time_s": wall_total,
                                        "bn_recalibration_batches": recalibrate})
        evaluation = evaluate.clean_metrics(compiled, state, data[2], data[3],
                                            config.eval.batch_size)
        if config.eval.corruption_dir:
            evaluation.update(evaluate.corruption_metrics(
                compiled, state, config.eval.corruption_dir, config.eval.batch_size,
                n_examples=config.eval.corruption_examples,
                extra=config.eval.extra_corruptions, pad_to=config.data.pad_to))
        clean = np.asarray(evaluation["clean_acc"])
    finally:
        if writer:
            writer.flush()
    params0 = state_lib.index(host_state.params, 0)
    results = {
        **evaluation,
        **compression_report(exp, host_state),
        "packed_bytes": packing.packed_sizes(exp, host_state),
        "num_prunable": [masks.num_prunable(params0)] * R,
        "num_params_total": [int(sum(np.size(x) for x in jax.tree.leaves(params0)))] * R,
        "steps": [final_plan.end] * R,
        "wall_time_s": [wall_total] * R,
        "realization_seeds": train.realization_seeds(config),
        "method": config.method.name,
        "binary": exp.method.binary,
        "bn_recalibration_batches": recalibrate,
        "levels": levels_summary,
        "level0_from": "" if level0_source is None else str(level0_source),
        "strategy": first.strategy,
        "dataset": train.dataset_info(exp.dataset),
        "format_version": card_jax.FORMAT_VERSION,
    }
    if writer:
        writer.write_scalars(final_plan.end, {"accuracy": clean}, split="test")
        writer.close()
    if is_main:
        _write_json(results_path, results)
    log.info("done: clean test accuracy per realization %s, sparsity %s",
             train.format_values(clean), train.format_values(results["sparsity_global"]))
    return results

"""Command line: `python -m card_jax.main --config=configs/<name>.py[:arg] --workdir=DIR`.

Overrides use ml_collections syntax, `--config.optim.lr=0.05`. The config is locked, so a typo
is an error: it is checked before anything runs, with the valid keys and the closest match.
Multi-host: pass --coordinator_address, --num_processes and --process_id (jax.distributed).
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from card_jax import config_util

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file path[:arg]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics, results")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in a multi-host run")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index")

EXIT_BAD_INPUT, EXIT_TRAINING_FAILED = 2, 3


def precheck(argv: list[str]) -> None:
    """Validates --config and its overrides before absl parses them (clear one-line errors)."""
    specs = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    if not specs:
        raise config_util.ConfigError("--config=configs/<name>.py[:arg] is required")
    config = config_util.load_config_file(specs[-1])
    config_util.apply_overrides(config, argv)
    config_util.refuse_legacy_keys(config)
    if "deck" in config:  # a CARD-Deck of finished runs: no data/method of its own
        from card_jax.deck import members, options

        options.check(config)
        members.check(members.describe(config.deck.members), options.groups_of(config))
        if not any(a.startswith("--workdir=") for a in argv) and "--workdir" not in argv:
            raise config_util.ConfigError("--workdir=DIR is required")
        return
    # Fail fast on a missing dataset, before JAX is even imported (numpy-only check).
    from card_jax.data import sources

    sources.check_available(config.data.name, config.data.dir)
    overridden = [a[len("--config.method."):].partition("=")[0] for a in argv
                  if a.startswith("--config.method.")]
    from card_jax import pruning

    try:
        pruning.check_options_used(config.method.name, overridden)
    except ValueError as e:
        raise config_util.ConfigError(str(e)) from None
    if not any(a.startswith("--workdir=") for a in argv) and "--workdir" not in argv:
        raise config_util.ConfigError("--workdir=DIR is required")


def main(argv: list[str]) -> None:
    del argv
    logging.getLogger("card_jax").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every save at INFO
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "no TPU" notices
    import jax  # after flag parsing, so --help stays fast

    config = _CONFIG.value
    if "deck" in config:  # before JAX's backends start (the setting is read once)
        from card_jax.deck import run as deck_run

        deck_run.use_synchronous_dispatch()
    if _COORDINATOR.value:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    from card_jax import checkpoint, run, train

    try:
        config_util.refuse_legacy_keys(config)
        if "deck" in config:
            deck_run.build_and_evaluate(config, _WORKDIR.value)
        else:
            run.train_and_evaluate(config, _WORKDIR.value)
    except (config_util.ConfigError, run.ConfigMismatchError, FileNotFoundError,
            checkpoint.CheckpointError, ValueError) as e:
        logging.error("%s", e)
        sys.exit(EXIT_BAD_INPUT)
    except train.NonFiniteLossError as e:
        logging.error("%s", e)
        sys.exit(EXIT_TRAINING_FAILED)


def run() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from card_jax.data.sources import DatasetNotFoundError

    try:
        precheck(sys.argv[1:])
    except (config_util.ConfigError, DatasetNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    app.run(main)


if __name__ == "__main__":
    from card_jax import entry

    entry.prepare()  # XLA:CPU flags and malloc tunables for this machine (card_jax/entry.py)
    run()

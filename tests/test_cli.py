"""The command line: bad overrides and missing data fail fast with clear messages."""

from __future__ import annotations

import time

from card_jax import config_util
from tests.helpers import SMOKE, run_cli

import pytest


def test_wrong_type_names_key_and_value(tmp_path):
    out = run_cli(f"--config={SMOKE}", f"--workdir={tmp_path}", "--config.optim.lr=oops")
    assert out.returncode == 2
    assert "optim.lr" in out.stderr and "'oops'" in out.stderr and "float" in out.stderr
    assert "Traceback" not in out.stderr


def test_unknown_key_lists_valid_keys_and_suggests(tmp_path):
    out = run_cli(f"--config={SMOKE}", f"--workdir={tmp_path}", "--config.optim.lrr=0.1")
    assert out.returncode == 2
    assert "unknown key 'lrr' in optim" in out.stderr
    assert 'Did you mean "lr"?' in out.stderr
    assert "momentum" in out.stderr and "weight_decay" in out.stderr  # the valid keys
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "config.json").exists()


def test_missing_dataset_fails_fast_naming_files(tmp_path):
    start = time.monotonic()
    out = run_cli(f"--config={SMOKE}", f"--workdir={tmp_path}", "--config.data.name=fashion_mnist",
                  f"--config.data.dir={tmp_path / 'nowhere'}")
    elapsed = time.monotonic() - start
    assert out.returncode == 2
    for name in ("train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        assert name in out.stderr
    assert "dataset-fashion-mnist" in out.stderr
    assert elapsed < 5.0  # the check itself runs before JAX is imported (see precheck)


def test_check_overrides_messages():
    config = config_util.load_config_file(SMOKE)
    with pytest.raises(config_util.ConfigError, match="Valid keys there: .*realizations"):
        config_util.check_overrides(config, ["--config.train.realisations=3"])
    with pytest.raises(config_util.ConfigError, match="expected an integer"):
        config_util.check_overrides(config, ["--config.train.realizations=2.5"])
    with pytest.raises(config_util.ConfigError, match="is a group of keys"):
        config_util.check_overrides(config, ["--config.optim=3"])
    config_util.apply_overrides(config, ["--config.optim.lr=0.5", "--config.data.flip=false"])
    assert config.optim.lr == 0.5 and config.data.flip is False


def test_prune_rate_is_refused_with_the_mapping():
    config = config_util.load_config_file(SMOKE)
    config.method.prune_rate = 0.2
    with pytest.raises(config_util.ConfigError, match="sparsity = 1 - prune_rate"):
        config_util.refuse_legacy_keys(config)

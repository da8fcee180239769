"""Every paper config parses, names its command, and runs its :smoke variant end to end."""

from __future__ import annotations

import importlib
import json

import pytest

from card_jax import config_util, run
from tests.helpers import REPO

SEC22 = importlib.import_module("configs.paper_sec22")
SEC33 = importlib.import_module("configs.paper_sec33")

# Every method once (on the cheapest model to compile), every model once; the deep ResNets
# as dense runs to bound compile time. A smoke run trains on synthetic data whatever the
# dataset, so sec33's CIFAR-100 variants are only loaded (`test_full_configs_...`).
SMOKE_RUNS = (
    [f"paper_sec22.py:conv2,{m},0.8,smoke" for m in SEC22.METHODS]
    + [f"paper_sec22.py:{m},dense,0.8,smoke" for m in SEC22.MODELS if m != "conv2"]
    + ["paper_sec33.py:cifar10,wrn18_2,clean,lrr,0.95,smoke",
       "paper_sec33.py:cifar10,resnet18,clean,bp_layerwise,0.9,smoke",
       "paper_sec33.py:cifar10,resnet50,clean,dense,0.9,smoke",
       "paper_sec33.py:cifar10,resnext29,clean,dense,0.9,smoke"]
)


@pytest.mark.parametrize("spec", SMOKE_RUNS)
def test_smoke_variant_runs(spec, tmp_path, fast_compile):
    config = config_util.load_config_file(str(REPO / "configs" / spec))
    results = run.train_and_evaluate(config, tmp_path)
    assert len(results["clean_acc"]) == 2
    if config.method.name != "dense":
        target = config.method.sparsity
        for s in results["sparsity_global"]:
            assert abs(s - target) < 0.01, (spec, s)


@pytest.mark.parametrize("module", [SEC22, SEC33])
def test_docstring_gives_command_and_expectation(module):
    doc = module.__doc__
    assert "python -m card_jax.main --config=configs/" in doc
    assert "Expected" in doc


def test_full_configs_match_the_paper_grid():
    c = config_util.load_config_file(str(REPO / "configs" / "paper_sec22.py:conv8,lrr,0.95"))
    assert (c.data.name, c.train.realizations, c.train.epochs) == ("cifar10", 5, 160.0)
    assert c.method.scope == "global" and c.method.sparsity == 0.95
    c = config_util.load_config_file(
        str(REPO / "configs" / "paper_sec33.py:cifar10,wrn18_2,gaussian,bp_layerwise,0.9"))
    assert c.model.kw.width == 128 and c.model.kw.bn_affine is False
    assert c.method.scope == "layerwise" and c.data.augment == "gaussian"
    assert c.train.realizations == 3
    c = config_util.load_config_file(
        str(REPO / "configs" / "paper_sec33.py:cifar100,wrn18_2,clean,ep,0.95"))
    assert (c.data.name, c.method.name, c.model.kw.width) == ("cifar100", "ep", 128)
    assert c.model.kw.bn_affine is False
    with pytest.raises(ValueError, match="CIFAR-100"):
        config_util.load_config_file(
            str(REPO / "configs" / "paper_sec33.py:cifar100,resnet50,clean,lrr,0.9"))


def test_paper_lth_takes_level0_from_the_dense_openlth_run(tmp_path, fast_compile):
    """sec22's pairing end to end: the level-0 source trains, LTH copies it and goes on."""
    source = tmp_path / "level0"
    run.train_and_evaluate(config_util.load_config_file(
        str(REPO / "configs" / f"paper_sec22.py:conv2,{SEC22.LEVEL0_SOURCE},smoke")), source)
    config = config_util.load_config_file(
        str(REPO / "configs" / "paper_sec22.py:conv2,lth,0.5,smoke"))
    config.method.level0_from = str(source)
    results = run.train_and_evaluate(config, tmp_path / "lth")
    assert results["level0_from"] == str(source)
    source_results = json.loads((source / "results.json").read_text())
    assert results["levels"][0]["clean_acc"] == source_results["clean_acc"]
    assert [abs(s - 0.5) < 0.01 for s in results["sparsity_global"]] == [True, True]

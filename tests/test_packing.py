"""Packed CARD files (card_jax.packing): exact round trips, every mask coder, the size bound
on a realistic Conv8, and a trained biprop run exported, reloaded and predicting identically."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

from card_jax import export, models, packing, run, steps
from card_jax import state as state_lib
from card_jax.data import pipeline
from tests.helpers import run_cli, smoke_config

DENSITIES = (0.5, 0.2, 0.05, 0.01)
META = dict(config={"model": {"name": "test"}}, dataset_info={"name": "none"}, realization=0)


def _bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x).view(f"u{x.dtype.itemsize}")


def _sparse(rng, shape, density, binary=False) -> np.ndarray:
    w = rng.standard_normal(shape).astype(np.float32) * 0.05
    keep = rng.random(shape) < density
    if binary:
        w = np.float32(0.0123) * np.sign(w)
    return np.where(keep, w, np.float32(0.0)).astype(np.float32)


def _tree(rng, binary=False, density=0.1):
    """A params tree with kernels of every kind, biases, an empty module, and BN stats."""
    params = {
        "conv1": {"kernel": _sparse(rng, (3, 3, 3, 16), density, binary)},
        "blocks": {"0": {"conv": {"kernel": _sparse(rng, (3, 3, 16, 32), density, binary)},
                         "bn": {"scale": rng.random(32).astype(np.float32) + 0.5,
                                "bias": rng.standard_normal(32).astype(np.float32)}},
                   "1": {}},
        "fc": {"kernel": _sparse(rng, (32, 10), density, binary),
               "bias": rng.standard_normal(10).astype(np.float32)},
    }
    batch_stats = {"blocks": {"0": {"bn": {"mean": rng.standard_normal(32).astype(np.float32),
                                           "var": rng.random(32).astype(np.float32) + 0.1}}}}
    return params, batch_stats


def _assert_same_tree(got, want, exact=True):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.shape == w.shape and g.dtype == w.dtype
        if exact:
            np.testing.assert_array_equal(_bits(g), _bits(w))
        else:
            np.testing.assert_array_equal(g, w.astype(np.float16).astype(w.dtype))


def test_round_trip_float32_is_bit_identical():
    rng = np.random.default_rng(0)
    params, batch_stats = _tree(rng)
    # -0.0 and subnormals are kept weights (nonzero bit patterns) and must survive as such.
    params["conv1"]["kernel"][0, 0, 0, :3] = [-0.0, 1e-42, -3.0e38]
    data = packing.pack(params, batch_stats, binary=False, **META)
    got_params, got_stats, meta = packing.unpack(data)
    _assert_same_tree(got_params, params)
    _assert_same_tree(got_stats, batch_stats)
    assert got_params["blocks"]["1"] == {}  # empty sub-dicts survive (the skeleton keeps them)
    assert meta["config"] == META["config"] and meta["dataset"] == META["dataset_info"]
    assert meta["realization"] == 0 and meta["binary"] is False
    assert meta["value_dtype"] == "float32"


def test_round_trip_float16_rounds_values_and_keeps_masks():
    rng = np.random.default_rng(1)
    params, batch_stats = _tree(rng)
    data = packing.pack(params, batch_stats, binary=False, value_dtype="float16", **META)
    got_params, got_stats, _ = packing.unpack(data)
    _assert_same_tree(got_params, params, exact=False)
    _assert_same_tree(got_stats, batch_stats, exact=False)
    assert len(data) < len(packing.pack(params, batch_stats, binary=False, **META))
    # A value that float16 cannot hold keeps its leaf in float32, exactly.
    params["fc"]["bias"][0] = 1e6
    got_params, _, meta = packing.unpack(
        packing.pack(params, batch_stats, binary=False, value_dtype="float16", **META))
    np.testing.assert_array_equal(got_params["fc"]["bias"], params["fc"]["bias"])


def test_binary_round_trip_uses_one_sign_bit_per_kept_weight():
    rng = np.random.default_rng(2)
    params, batch_stats = _tree(rng, binary=True, density=0.3)
    data = packing.pack(params, batch_stats, binary=True, **META)
    got_params, got_stats, meta = packing.unpack(data)
    _assert_same_tree(got_params, params)
    _assert_same_tree(got_stats, batch_stats)
    for got, want in zip(jax.tree.leaves(got_params), jax.tree.leaves(params)):
        if want.ndim >= 2:
            assert set(np.unique(got)) <= {np.float32(-0.0123), np.float32(0.0),
                                           np.float32(0.0123)}
    assert meta["binary"] is True
    info = packing.describe(data)
    for row in info["leaves"]:
        if "kept" in row:
            assert row["values"] == "signs"
            assert row["value_bytes"] == 4 + math.ceil(row["kept"] / 8)


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shape", [(3, 3, 16, 64), (200, 10)])
def test_every_mask_coder_at_every_density(density, shape):
    rng = np.random.default_rng(int(density * 1000))
    bits = (rng.random(shape) < density).astype(np.uint8).reshape(-1)
    n, positions = bits.size, np.flatnonzero(bits)
    # Each coder on its own ...
    assert np.array_equal(packing._decode_mask(
        {"coder": "bitmap", "kept": positions.size}, np.packbits(bits).tobytes(), shape), bits)
    for k in range(0, 9):
        data = packing._rice_encode(positions, k)
        assert len(data) == packing._rice_sizes(np.diff(positions, prepend=-1) - 1, k)
        np.testing.assert_array_equal(packing._rice_decode(data, n, positions.size, k),
                                      positions)
    _, _, lanes = packing._rans_geometry(shape)
    f1 = packing._rans_model(bits, shape)
    data = packing._rans_encode(bits, f1, lanes)
    np.testing.assert_array_equal(packing._rans_decode(data, shape, lanes), bits)
    assert abs(len(data) - packing._rans_estimate(bits, f1, lanes)) <= 0.02 * len(data) + 16
    # ... and the automatic choice, which is never larger than the bitmap and, on i.i.d.
    # masks, within 5% + 64 bytes of the mask entropy.
    spec, data = packing._encode_mask(bits, shape)
    np.testing.assert_array_equal(packing._decode_mask(spec, data, shape), bits.astype(bool))
    assert len(data) <= math.ceil(n / 8)
    entropy = packing.information_bound_bytes(positions.size / n, n, 0)
    assert len(data) <= 1.05 * entropy + 64


@pytest.mark.parametrize("shape,fill", [((4, 5), 1), ((4, 5), 0), ((1, 1), 1), ((1, 1), 0),
                                        ((3, 3, 8, 8), "first"), ((3, 3, 8, 8), "last"),
                                        ((3, 3, 8, 8), "all_but_one")])
def test_mask_edge_cases(shape, fill):
    n = math.prod(shape)
    bits = np.zeros(n, np.uint8)
    if fill == 1:
        bits[:] = 1
    elif fill == "first":
        bits[0] = 1
    elif fill == "last":
        bits[-1] = 1
    elif fill == "all_but_one":
        bits[:] = 1
        bits[n // 2] = 0
    spec, data = packing._encode_mask(bits, shape)
    np.testing.assert_array_equal(packing._decode_mask(spec, data, shape), bits.astype(bool))
    if bits.all() or not bits.any():
        assert spec["coder"] in ("all", "none") and data == b""
    # The whole-file path too, with the values.
    w = np.where(bits.reshape(shape), np.float32(-0.5), np.float32(0.0))
    got, _, _ = packing.unpack(packing.pack({"k": w}, {}, binary=True, **META))
    np.testing.assert_array_equal(_bits(got["k"]), _bits(w))


def test_adaptive_coder_wins_on_structured_masks():
    """Per-output-channel densities and dead input channels: the context model beats the
    i.i.d. coders (and the i.i.d. entropy)."""
    rng = np.random.default_rng(3)
    shape = (3, 3, 64, 128)
    density = np.exp(rng.uniform(np.log(0.002), np.log(0.3), shape[-1]))
    alive = rng.random(shape[-2]) < 0.7
    bits = (rng.random(shape) < density * alive[:, None]).astype(np.uint8).reshape(-1)
    spec, data = packing._encode_mask(bits, shape)
    assert spec["coder"] == "rans"
    np.testing.assert_array_equal(packing._decode_mask(spec, data, shape), bits.astype(bool))
    positions = np.flatnonzero(bits)
    rice = min(packing._rice_sizes(np.diff(positions, prepend=-1) - 1, k) for k in range(12))
    assert len(data) < 0.95 * rice
    assert len(data) < packing.information_bound_bytes(bits.mean(), bits.size, 0)


def test_information_bound_bytes():
    assert packing.information_bound_bytes(0.5, 8, 4) == 2  # 8 mask bits + 4 sign bits
    assert packing.information_bound_bytes(0.0, 100, 0) == 0
    assert packing.information_bound_bytes(1.0, 100, 100) == 13
    h = -(0.05 * math.log2(0.05) + 0.95 * math.log2(0.95))
    assert packing.information_bound_bytes(0.05, 1000, 50) == math.ceil((1000 * h + 50) / 8)
    assert packing.information_bound_bytes(0.05, 1000, 50, 32) == math.ceil((1000 * h + 1600) / 8)


def test_conv8_binary_at_95_percent_sparsity_is_within_bound():
    """5.28 M prunable weights, random 95% mask per layer, binary (alpha_l sign(W) m)."""
    # The model's shapes (abstract build: eager initialisation takes seconds on CPU); only
    # sign(W), the mask and one alpha per layer matter for a binary CARD.
    model = nnx.eval_shape(lambda: models.build(
        "conv8", num_classes=10, in_channels=3, mean=(0.5,) * 3, std=(0.5,) * 3,
        rngs=nnx.Rngs(0), width=1.0))
    _, params, batch_stats = state_lib.split_model(model)
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(params)) == 5_275_840  # "5.28 M"
    assert jax.tree.leaves(batch_stats) == []
    rng = np.random.default_rng(0)

    def binary_card(shape):
        alpha = np.float32(rng.uniform(0.01, 0.1))
        sign = np.where(rng.random(shape) < 0.5, -alpha, alpha)
        return np.where(rng.random(shape) < 0.05, sign, 0.0).astype(np.float32)

    effective = jax.tree.map(lambda a: binary_card(a.shape), params)
    data = packing.pack(effective, {}, binary=True, config=smoke_config().to_dict(),
                        dataset_info={"name": "synthetic"}, realization=0)
    info = packing.describe(data)
    bound = packing.information_bound(effective)
    assert info["bound_bytes"] == bound
    kernels = info["kernel_mask_bytes"] + info["kernel_value_bytes"]
    assert kernels <= 1.25 * bound, (kernels, bound)
    assert info["header_bytes"] <= 2048
    assert len(data) <= 1.25 * bound + 2048
    got, _, _ = packing.unpack(data)
    _assert_same_tree(got, effective)


def test_corrupt_files_are_refused():
    rng = np.random.default_rng(4)
    params, batch_stats = _tree(rng)
    data = bytearray(packing.pack(params, batch_stats, binary=False, **META))
    with pytest.raises(ValueError, match="magic"):
        packing.unpack(b"NOTACARD" + bytes(data[8:]))
    data[-5] ^= 0xFF
    with pytest.raises(ValueError, match="corrupt"):
        packing.unpack(bytes(data))
    with pytest.raises(ValueError, match="value_dtype"):
        packing.pack(params, batch_stats, binary=False, value_dtype="int8", **META)


@pytest.mark.slow
def test_trained_biprop_card_exports_and_predicts_identically(tmp_path, monkeypatch):
    config = smoke_config(train__steps=20, method__name="bp", method__sparsity=0.8,
                          method__warmup_epochs=0.5)
    results = run.train_and_evaluate(config, tmp_path)
    assert results["binary"] is True
    out = run_cli(f"--workdir={tmp_path}", "--packed", f"--out={tmp_path / 'card_{r}.pack'}",
                  module="card_jax.export")
    assert out.returncode == 0, out.stderr[-2000:]
    sizes = [(tmp_path / f"card_{r}.pack").stat().st_size for r in range(2)]
    assert "information bound" in out.stdout
    # run.py records the same sizes (same config, dataset info and weights).
    assert json.loads((tmp_path / "results.json").read_text())["packed_bytes"] == sizes

    exp, state = export.load_final_state(tmp_path)
    # packed_bytes(workdir) = load_final_state + packing; the loading (seconds of model
    # building) was just done, so reuse it.
    monkeypatch.setattr(export, "load_final_state", lambda workdir: (exp, state))
    assert export.packed_bytes(tmp_path) == sizes
    x = pipeline.to_float(np.asarray(
        run.train.load_data(config.data).test_images[:64]))

    @jax.jit
    def reference(params, batch_stats, method_state, x):
        return steps.forward(exp.graphdef, exp.method, params, batch_stats, method_state, x,
                             train=False)[0]

    for r in range(2):
        card = export.load_packed(tmp_path / f"card_{r}.pack")
        assert card.meta["realization"] == r
        want = np.asarray(reference(state_lib.index(state.params, r),
                                    state_lib.index(state.batch_stats, r),
                                    state_lib.index(state.method_state, r), x))
        got = card.predict(x)
        np.testing.assert_array_equal(got, want)  # bit-identical logits
        # The card is really sparse and binary.
        info = packing.describe((tmp_path / f"card_{r}.pack").read_bytes())
        assert all(row["values"] == "signs" for row in info["leaves"] if "kept" in row)

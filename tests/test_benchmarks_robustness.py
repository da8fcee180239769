"""benchmarks/robustness.py --quick runs end to end and emits one well-formed JSON document.

Only structure and sanity are checked: timings on shared CI machines are noise, so the
heat-map target (`heatmap_over_plain >= 0.8`) is reported by the benchmark, never asserted.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.helpers import REPO, cli_env

QUICK_CORRUPTIONS = ["gaussian_noise", "glass_blur", "jpeg_compression", "contrast"]
RATE_KEYS = {"images_per_s", "images_per_s_max", "images_per_s_samples"}


@pytest.fixture(scope="module")
def quick_result() -> dict:
    # The command CI runs (~25 s on 2 busy CPU cores). cli_env drops the 4 fake devices of
    # conftest: the benchmark measures a plain 1-device user run.
    out = subprocess.run([sys.executable, "benchmarks/robustness.py", "--quick"], cwd=REPO,
                         env=cli_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout)  # stdout must hold exactly one JSON document


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def check_rates(entry: dict, where: str) -> None:
    assert RATE_KEYS <= set(entry), where
    assert positive(entry["images_per_s"]) and positive(entry["images_per_s_max"]), where
    assert entry["images_per_s_samples"] and all(positive(r)
                                                 for r in entry["images_per_s_samples"]), where
    assert entry["images_per_s"] <= entry["images_per_s_max"], where


def check_ratio(entry: dict, target: float | None) -> None:
    assert positive(entry["value"]) and positive(entry["paired_median"])
    assert isinstance(entry["definition"], str) and entry["definition"]
    if target is None:
        assert "target" not in entry and "met" not in entry
    else:
        assert entry["target"] == target
        assert entry["met"] is (entry["value"] >= target)


@pytest.mark.slow
def test_top_level_structure(quick_result):
    doc = quick_result
    assert doc["benchmark"] == "robustness" and doc["quick"] is True
    assert {"settings", "environment", "corruption_generation", "heatmap", "corruption_eval",
            "section_s", "wall_s"} <= set(doc)
    env = doc["environment"]
    assert env["device_count"] == 1 and env["backend"] == "cpu"
    assert {"python", "jax", "flax", "cpu_count"} <= set(env)
    assert doc["settings"]["width"] == 0.25 and doc["settings"]["realizations"] == 2
    assert positive(doc["wall_s"])
    assert all(positive(s) for s in doc["section_s"].values())


@pytest.mark.slow
def test_corruption_generation(quick_result):
    gen = quick_result["corruption_generation"]
    assert gen["images_per_call"] == 64 and gen["severities"] == [3]
    assert gen["corruption_names"] == QUICK_CORRUPTIONS
    assert set(gen["shapes"]) == {"28x28x1", "32x32x3"}
    for shape_key, shape in gen["shapes"].items():
        assert "x".join(map(str, shape["image_shape"])) == shape_key
        assert list(shape["corruptions"]) == QUICK_CORRUPTIONS
        for name, entry in shape["corruptions"].items():
            check_rates(entry, f"{shape_key}/{name}")
            assert len(entry["images_per_s_samples"]) == gen["reps"]
            assert positive(entry["first_call_s"]) and entry["calls_per_sample"] >= 1
        assert positive(shape["all_listed_images_per_s"])
        assert shape["slowest"] in QUICK_CORRUPTIONS
        # A harmonic combination lies between the slowest and the fastest corruption.
        rates = [e["images_per_s"] for e in shape["corruptions"].values()]
        assert min(rates) <= shape["all_listed_images_per_s"] * (1 + 1e-9)
        assert shape["all_listed_images_per_s"] <= max(rates) * (1 + 1e-9)


@pytest.mark.slow
def test_heatmap_vs_plain(quick_result):
    heat = quick_result["heatmap"]
    assert heat["model"] == "conv4" and heat["realizations"] == 2
    assert heat["images"] == 4 and heat["eps"] == [3.0, 4.0, 6.0]
    assert heat["frequencies"] == 514  # 32 x 32: h * w / 2 + 2 Hermitian pairs
    assert heat["padded_frequencies"] % heat["freq_chunk"] == 0
    assert heat["model_batch"] == heat["freq_chunk"] * 3 * heat["batch_size"]
    assert heat["heatmap"]["images"] == 4 * 3 * 514
    # Same number of predict calls at the same batch: plain covers the padded frequencies.
    assert heat["plain"]["images"] == heat["predict_calls"] * heat["model_batch"]
    for name in ("heatmap", "plain"):
        entry = heat[name]
        check_rates(entry, name)
        assert len(entry["seconds_samples"]) == heat["rounds"]
        assert all(positive(s) for s in entry["seconds_samples"])
        assert positive(entry["first_call_s"])
    # Plain evaluation compiles once, before the timed calls.
    assert heat["plain"]["first_call_compiles"] == 1
    assert heat["plain"]["xla_compiles_per_call"] == [0] * heat["rounds"]
    assert positive(heat["heatmap"]["images_per_s_incl_compile"])
    check_ratio(heat["heatmap_over_plain"], 0.8)
    check_ratio(heat["heatmap_over_plain_incl_compile"], None)


@pytest.mark.slow
def test_corruption_eval(quick_result):
    c_eval = quick_result["corruption_eval"]
    assert c_eval["images_per_cell"] == 40 and c_eval["cells"] == 75
    assert c_eval["images"] == 75 * 40
    assert positive(c_eval["folder_mb"])
    for name in ("corruption_metrics", "plain"):
        check_rates(c_eval[name], name)
        assert c_eval[name]["evaluated_images"] >= c_eval["images"]
    check_ratio(c_eval["corruption_eval_over_plain"], None)
    # Every cell holds the clean images: both paths must report the same accuracy.
    assert c_eval["accuracy_match"] is True
    assert len(c_eval["accuracy"]) == 2

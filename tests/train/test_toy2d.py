"""The 2-D proof: its data, its metrics, the CLI's outputs, and the short run that must show Self-E >> FM at 2 steps."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from selfe.cli import main as selfe_main
from selfe.train.toy2d.data import RingMixture, load_npz
from selfe.train.toy2d.metrics import (
    evaluate_samples,
    knn_precision_recall,
    mode_coverage,
    mode_precision,
    sliced_wasserstein,
)


def test_ring_interleaves_conditions_and_puts_each_mean_off_its_data():
    data = RingMixture(num_conditions=4, modes_per_condition=3)
    assert data.owners.tolist() == [0, 1, 2, 3] * 3
    x, y = data.sample(40_000, torch.Generator().manual_seed(0))
    for c in range(4):
        mean = x[y == c].mean(0)
        assert mean.norm() < 0.1 * data.radius  # the conditional mean sits at the centre
        assert mode_precision(mean[None], torch.tensor([c]), data) == 0.0
    # In 2-D, P(|z| <= 3 sigma) = 1 - exp(-9/2) = 0.9889: the ceiling of the precision metric.
    assert mode_precision(x, y, data) == pytest.approx(1 - math.exp(-4.5), abs=0.003)
    assert mode_coverage(x, y, data) == 1.0


@pytest.mark.slow
def test_metrics_separate_good_from_bad_samples():
    data = RingMixture()
    g = torch.Generator().manual_seed(1)
    x, y = data.sample(4000, g)
    x_ref, y_ref = data.sample(4000, g)
    wrong = (y + 1) % data.num_conditions  # right places, wrong conditions
    assert mode_precision(x, wrong, data) < 0.01
    assert sliced_wasserstein(x, x_ref) < 0.08  # sampling noise of the mode weights
    assert sliced_wasserstein(x, x_ref + 1.0) > 0.5
    precision, recall = knn_precision_recall(x, y, x_ref, y_ref)
    assert precision > 0.9 and recall > 0.9
    collapsed = torch.zeros_like(x)
    p_c, r_c = knn_precision_recall(collapsed, y, x_ref, y_ref)
    assert p_c < 0.05 and r_c < 0.05
    nan_rows = x.clone()
    nan_rows[:2000] = float("nan")
    result = evaluate_samples(nan_rows, y, x_ref, y_ref, data)
    assert result["finite_fraction"] == 0.5 and result["precision"] <= 0.5


def test_mode_coverage_counts_missing_modes():
    data = RingMixture()
    y = torch.zeros(300, dtype=torch.long)
    first_mode = data.centers[0].expand(300, 2)
    assert mode_coverage(first_mode, y, data) == pytest.approx(1 / 12)  # 1 of the 12 (condition, mode) pairs


def test_load_npz_validates(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, x=np.random.randn(50, 2), y=np.arange(50) % 3)
    x, y = load_npz(good)
    assert x.shape == (50, 2) and x.dtype == torch.float32 and y.dtype == torch.int64
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.random.randn(50, 3), y=np.arange(50))
    with pytest.raises(ValueError, match=r"x must have shape \(N, 2\)"):
        load_npz(bad)
    np.savez(bad, x=np.random.randn(50, 2))
    with pytest.raises(ValueError, match="lacks"):
        load_npz(bad)
    np.savez(bad, x=np.random.randn(50, 2), y=np.random.rand(50))
    with pytest.raises(ValueError, match="integer labels"):
        load_npz(bad)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_npz(tmp_path / "missing.npz")


def _tiny_cli(out, *extra):
    return selfe_main(
        ["toy2d", "--out", str(out), "--iterations", "20", "--batch-size", "64", "--eval-samples", "120",
         "--steps", "1", "2", "--jobs", "1", "--set", "width=32", "depth=1", "log_every=10", *extra]
    )


@pytest.mark.slow
def test_cli_writes_table_json_png_and_samples(tmp_path, capsys):
    assert _tiny_cli(tmp_path) == 0
    printed = capsys.readouterr().out
    assert "| flow_matching | precision |" in printed and "| selfe | precision |" in printed
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["methods"]) == {"flow_matching", "selfe"}
    assert set(results["methods"]["selfe"]["metrics"]) == {"1", "2"}
    assert (tmp_path / "toy2d.png").stat().st_size > 1000
    for method in ("flow_matching", "selfe"):
        for steps in (1, 2):
            with np.load(tmp_path / f"{method}_{steps}.npz") as f:
                assert f["x"].shape == (120, 2) and f["y"].shape == (120,) and f["y"].dtype == np.int64


@pytest.mark.slow
def test_cli_takes_user_data_and_falls_back_to_knn_metrics(tmp_path, capsys):
    x, y = RingMixture(num_conditions=2, modes_per_condition=2).sample(600, torch.Generator().manual_seed(0))
    data = tmp_path / "mine.npz"
    np.savez(data, x=x.numpy(), y=y.numpy())
    assert _tiny_cli(tmp_path / "out", "--data", str(data)) == 0
    metrics = json.loads((tmp_path / "out" / "results.json").read_text())["methods"]["selfe"]["metrics"]["2"]
    assert "recall" in metrics and "coverage" not in metrics
    assert "k-NN" in capsys.readouterr().out


def test_cli_rejects_bad_overrides(tmp_path):
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        _tiny_cli(tmp_path, "--set", "no_such_field=3")


@pytest.mark.slow
def test_short_run_shows_selfe_far_above_flow_matching_at_two_steps():
    """The CI version of `selfe toy2d`: a small, short run through the real objective and sampler."""
    from selfe.train.toy2d.experiment import Toy2DConfig, run_experiment

    config = Toy2DConfig(iterations=1000, width=64, depth=2, steps=(2,), eval_samples=1000, log_every=1000)
    data = config.data
    g = torch.Generator().manual_seed(123)
    results = run_experiment(config, data.sample(50_000, g), data.sample(2000, g), data)
    fm = results["methods"]["flow_matching"]["metrics"][2]["precision"]
    selfe = results["methods"]["selfe"]["metrics"][2]["precision"]
    assert selfe > 0.7, (fm, selfe)
    assert (1 - selfe) < 0.5 * (1 - fm), (fm, selfe)  # Self-E's off-mode share under half of flow matching's

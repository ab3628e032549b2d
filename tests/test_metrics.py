"""Figures that fit the task: which task a model solves, and its figures
checked against plain formulas and scikit-learn's."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dbnode.data import XOR_ROWS, XOR_TARGETS
from dbnode.metrics import (
    CLASSIFICATION,
    REGRESSION,
    data_warnings,
    evaluate,
    metric_names,
    per_class,
    probabilities,
    scores,
    task_of,
)
from dbnode.model import ModelSpec, init_params, predict

sklearn_metrics = pytest.importorskip("sklearn.metrics")

XOR = ModelSpec((2, 2, 1), dtype="float64")
LINEAR = ModelSpec((2, 3, 2), output="linear", dtype="float64")
SOFTMAX = ModelSpec((2, 4, 3), output="softmax", loss="cross_entropy", dtype="float64")


def test_the_task_follows_the_output_and_the_targets():
    assert task_of(XOR, XOR_TARGETS) == CLASSIFICATION
    assert task_of(SOFTMAX, np.array([0, 2, 1])) == CLASSIFICATION
    assert task_of(LINEAR, np.zeros((4, 2))) == REGRESSION
    # A sigmoid output fitted to values between 0 and 1 is a regression.
    assert task_of(XOR, np.array([0.2, 0.9, 1.0, 0.0])) == REGRESSION
    one_hot = ModelSpec((2, 3, 3), dtype="float64")
    assert task_of(one_hot, np.eye(3)[[0, 2, 1, 1]]) == CLASSIFICATION
    assert task_of(one_hot, np.array([[1, 1, 0], [0, 0, 1]])) == REGRESSION  # multi-label


def test_a_regressor_is_never_scored_by_accuracy():
    """The old rule scored any one-output model by thresholding at 0.5: a
    regression then read 100%."""
    spec = ModelSpec((1, 4, 1), output="linear", dtype="float64")
    x = np.linspace(0, 1, 50)[:, None]
    y = 3.0 + 2.0 * x[:, 0]  # every target above 0.5
    figures = evaluate(spec, init_params(spec, seed=1), x, y)
    assert list(figures) == list(metric_names(REGRESSION))
    assert "accuracy" not in figures and figures["mse"] > 1.0
    assert set(evaluate(XOR, init_params(XOR), XOR_ROWS, XOR_TARGETS)) == {"loss", "accuracy"}
    with pytest.raises(ValueError, match="empty"):
        evaluate(XOR, init_params(XOR), XOR_ROWS[:0], XOR_TARGETS[:0])


@settings(max_examples=60, deadline=None)
@given(
    arrays(np.float64, st.tuples(st.integers(2, 40), st.integers(1, 3)),
           elements=st.floats(-50, 50)),
    st.integers(0, 2**31),
)  # fmt: skip
def test_regression_figures_match_scikit_learn(t, seed):
    spec = ModelSpec((2, t.shape[1]), output="linear", dtype="float64")
    p = t + np.random.default_rng(seed).normal(0, 3, t.shape)
    figures = scores(spec, p, t, REGRESSION)
    assert figures["mse"] == pytest.approx(sklearn_metrics.mean_squared_error(t, p))
    assert figures["rmse"] == pytest.approx(np.sqrt(sklearn_metrics.mean_squared_error(t, p)))
    assert figures["mae"] == pytest.approx(sklearn_metrics.mean_absolute_error(t, p))
    assert figures["r2"] == pytest.approx(
        sklearn_metrics.r2_score(t, p, force_finite=True), abs=1e-9
    )
    assert figures["loss"] == pytest.approx(0.5 * np.sum((t - p) ** 2) / len(t))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 200), st.integers(0, 2**31))
def test_classification_figures_match_scikit_learn(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3))
    out = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    figures = scores(SOFTMAX, out, y, CLASSIFICATION)
    guess = out.argmax(axis=1)
    assert figures["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(y, guess))
    p, r, f, s = sklearn_metrics.precision_recall_fscore_support(
        y, guess, labels=[0, 1, 2], zero_division=0
    )
    rows = per_class(SOFTMAX, out, y)
    assert [row["support"] for row in rows] == list(s)
    np.testing.assert_allclose([row["precision"] for row in rows], p)
    np.testing.assert_allclose([row["recall"] for row in rows], r)
    np.testing.assert_allclose([row["f1"] for row in rows], f)


def test_probabilities_have_one_column_per_class_and_sum_to_one():
    out = predict(XOR, init_params(XOR), XOR_ROWS)
    probs = probabilities(XOR, out)
    assert probs.shape == (4, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    np.testing.assert_allclose(probs[:, 1], out[:, 0])
    sig3 = ModelSpec((2, 3), dtype="float64")
    probs = probabilities(sig3, np.array([[0.2, 0.2, 0.6], [0.0, 0.0, 0.0]]))
    np.testing.assert_allclose(probs, [[0.2, 0.2, 0.6], [1 / 3, 1 / 3, 1 / 3]])


def test_data_warnings_name_targets_out_of_reach_and_unscaled_features():
    x = np.array([[0.5, 3000.0], [0.1, 20.0]])
    found = data_warnings(XOR, x, np.array([0.0, 4.0]), "prices.csv")
    assert len(found) == 2
    assert "prices.csv" in found[0] and "[0, 4]" in found[0] and "linear" in found[0]
    assert "3000" in found[1] and "column 1" in found[1]
    assert data_warnings(XOR, XOR_ROWS, XOR_TARGETS, "xor") == []
    assert data_warnings(LINEAR, XOR_ROWS, np.full((4, 2), 9.0), "xor") == []

"""How good a model is: the task it solves, and the figures that fit that task.

A model is a *classifier* when its targets are classes: integer labels
under cross-entropy, or 0/1 targets under a sigmoid or softmax output (one
output: the class is ``output > 0.5``; several: each target row one-hot and
the class the largest output). Anything else is a *regressor*: a linear
output, or targets that are not all 0 or 1. The task is decided once per
run from the training targets (:func:`task_of`), so every evaluation of a
run reports the same figures (:func:`metric_names`):

- classification: ``loss``, ``accuracy``; per class (:func:`per_class`),
  precision, recall, F1 and support;
- regression: ``loss``, ``mse``, ``rmse``, ``mae`` and ``r2`` (the
  coefficient of determination, averaged over outputs as scikit-learn's
  ``r2_score`` does).

Figures are computed in float64 whatever the model's dtype.
"""

from __future__ import annotations

import numpy as np

from .model import Loss, ModelSpec, predict

__all__ = [
    "CLASSIFICATION",
    "REGRESSION",
    "class_count",
    "data_warnings",
    "evaluate",
    "labels_of",
    "metric_names",
    "per_class",
    "predicted_labels",
    "probabilities",
    "r2",
    "scores",
    "task_of",
]

CLASSIFICATION = "classification"
REGRESSION = "regression"

_NAMES = {
    CLASSIFICATION: ("loss", "accuracy"),
    REGRESSION: ("loss", "mse", "rmse", "mae", "r2"),
}

# Features whose magnitude passes this are almost surely unscaled (pixels
# in 0..255, prices, counts): sigmoid and tanh units saturate on them.
UNSCALED = 100.0


def task_of(spec: ModelSpec, y: np.ndarray) -> str:
    """Whether a model trained on targets ``y`` is a classifier or a regressor.

    Args:
        spec: the network.
        y: its training targets (labels, or one row of values per example).

    Returns:
        :data:`CLASSIFICATION` or :data:`REGRESSION`.
    """
    if spec.takes_labels:
        return CLASSIFICATION
    if spec.output == "linear":
        return REGRESSION
    y = np.asarray(y)
    if y.size == 0 or not np.isin(y, (0, 1)).all():
        return REGRESSION
    if spec.layers[-1] > 1 and not np.all(y.reshape(len(y), -1).sum(axis=1) == 1):
        return REGRESSION  # several 0/1 outputs that are not one class each
    return CLASSIFICATION


def metric_names(task: str) -> tuple[str, ...]:
    """The figures an evaluation reports for ``task``, in column order.

    Args:
        task: :data:`CLASSIFICATION` or :data:`REGRESSION`.

    Returns:
        The names, ``loss`` first.

    Raises:
        ValueError: an unknown task.
    """
    try:
        return _NAMES[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(_NAMES)}") from None


def class_count(spec: ModelSpec) -> int:
    """How many classes a classifier tells apart (two for one sigmoid output).

    Args:
        spec: the network.

    Returns:
        The number of classes.
    """
    return max(2, spec.layers[-1])


def labels_of(spec: ModelSpec, y: np.ndarray) -> np.ndarray:
    """The class of each example from its targets (labels, 0/1 or one-hot rows).

    Args:
        spec: the network.
        y: the targets.

    Returns:
        An ``intp`` label per example.
    """
    y = np.asarray(y)
    if spec.takes_labels:
        return y.astype(np.intp).reshape(-1)
    rows = y.reshape(len(y), -1)
    if rows.shape[1] == 1:
        return (rows[:, 0] > 0.5).astype(np.intp)
    return rows.argmax(axis=1)


def predicted_labels(spec: ModelSpec, out: np.ndarray) -> np.ndarray:
    """The class a classifier's outputs choose for each example.

    Args:
        spec: the network.
        out: its outputs, ``(examples, outputs)``.

    Returns:
        An ``intp`` label per example.
    """
    if out.shape[1] == 1:
        return (out[:, 0] > 0.5).astype(np.intp)
    return out.argmax(axis=1)


def probabilities(spec: ModelSpec, out: np.ndarray) -> np.ndarray:
    """Class probabilities from a classifier's outputs, one column per class.

    A softmax output is that already; one sigmoid output ``p`` gives
    ``[1 - p, p]``; several sigmoid outputs are normalised to sum to one.

    Args:
        spec: the network.
        out: its outputs, ``(examples, outputs)``.

    Returns:
        ``(examples, classes)`` float64 probabilities.
    """
    out = np.asarray(out, dtype=np.float64)
    if out.shape[1] == 1:
        return np.hstack([1.0 - out, out])
    if spec.output == "softmax":
        return out
    total = out.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, out / total, 1.0 / out.shape[1])


def scores(spec: ModelSpec, out: np.ndarray, y: np.ndarray, task: str) -> dict[str, float]:
    """The figures of :func:`metric_names` for outputs ``out`` against targets ``y``.

    Args:
        spec: the network.
        out: its outputs, ``(examples, outputs)``.
        y: the targets.
        task: :data:`CLASSIFICATION` or :data:`REGRESSION`.

    Returns:
        Name -> value, in :func:`metric_names` order.

    Raises:
        ValueError: no examples, or an unknown task.
    """
    names = metric_names(task)
    if len(out) == 0:
        raise ValueError("evaluate: empty data set")
    loss = Loss(spec)
    targets = loss.targets(y)
    result = {"loss": float(loss(out, targets)[0])}
    if task == CLASSIFICATION:
        hits = predicted_labels(spec, out) == labels_of(spec, y)
        result["accuracy"] = float(np.mean(hits))
    else:
        t = np.asarray(targets, dtype=np.float64).reshape(out.shape)
        p = np.asarray(out, dtype=np.float64)
        error = p - t
        mse = float(np.mean(error**2))
        result.update(mse=mse, rmse=float(np.sqrt(mse)), mae=float(np.mean(np.abs(error))),
                      r2=r2(t, p))  # fmt: skip
    return {name: result[name] for name in names}


def r2(t: np.ndarray, p: np.ndarray, weights: np.ndarray | None = None) -> float:
    """The coefficient of determination, 1 - SS_res / SS_tot per output,
    averaged over outputs; an output whose targets are all equal scores 1
    if predicted exactly, else 0 (as scikit-learn's ``r2_score`` does).

    Args:
        t: targets, ``(examples, outputs)``.
        p: predictions, the same shape.
        weights: one per example (None: equal).

    Returns:
        R²; 1 is perfect, 0 is no better than the targets' mean.
    """
    t, p = np.asarray(t, np.float64), np.asarray(p, np.float64)
    w = np.ones(len(t)) if weights is None else np.asarray(weights, np.float64)
    w = w.reshape(-1, *([1] * (t.ndim - 1)))
    residual = (w * (t - p) ** 2).sum(axis=0)
    total = (w * (t - np.average(t, axis=0, weights=w.reshape(-1))) ** 2).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_output = np.where(
            total > 0, 1.0 - residual / np.where(total > 0, total, 1.0), (residual == 0) * 1.0
        )
    return float(np.mean(per_output))


def evaluate(
    spec: ModelSpec,
    params: dict[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    task: str | None = None,
) -> dict[str, float]:
    """How well ``params`` do on ``(x, y)``: the figures that fit the task.

    Args:
        spec: the network.
        params: its parameters.
        x: the inputs, ``(examples, features)``.
        y: their targets.
        task: :data:`CLASSIFICATION` or :data:`REGRESSION`; None: from
            ``y`` (:func:`task_of`) -- pass the training set's task to keep
            a run's figures the same from one evaluation to the next.

    Returns:
        ``{"loss", "accuracy"}`` for a classifier, ``{"loss", "mse",
        "rmse", "mae", "r2"}`` for a regressor.

    Raises:
        ValueError: no examples, or shapes that do not fit the network.
    """
    if len(x) == 0:
        raise ValueError("evaluate: empty data set")
    out = predict(spec, params, x)
    return scores(spec, out, y, task or task_of(spec, y))


def per_class(spec: ModelSpec, out: np.ndarray, y: np.ndarray) -> list[dict[str, float]]:
    """Precision, recall, F1 and support of each class (a classifier's outputs).

    Args:
        spec: the network.
        out: its outputs, ``(examples, outputs)``.
        y: the targets.

    Returns:
        One dict per class, in class order: ``class``, ``precision``,
        ``recall``, ``f1``, ``support`` (0.0 where a ratio has no
        denominator, as scikit-learn reports with ``zero_division=0``).
    """
    truth, guess = labels_of(spec, y), predicted_labels(spec, out)
    rows = []
    for k in range(class_count(spec)):
        tp = int(np.sum((guess == k) & (truth == k)))
        predicted, support = int(np.sum(guess == k)), int(np.sum(truth == k))
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append({"class": k, "precision": precision, "recall": recall, "f1": f1,
                     "support": support})  # fmt: skip
    return rows


def data_warnings(spec: ModelSpec, x: np.ndarray, y: np.ndarray, where: str) -> list[str]:
    """What about the data will likely make training go badly (it still runs).

    Args:
        spec: the network.
        x: the inputs.
        y: the targets.
        where: the data source, for the messages.

    Returns:
        One sentence per problem: targets outside what the output can
        produce, features far from scaled.
    """
    found = []
    if not spec.takes_labels and spec.output in ("sigmoid", "softmax") and len(y):
        low, high = float(np.min(y)), float(np.max(y))
        if low < 0 or high > 1:
            found.append(
                f"{where}: targets range over [{low:g}, {high:g}] but a {spec.output} output "
                f'only reaches (0, 1): use model.output = "linear" for regression, or '
                f"scale the targets"
            )
    if x.size:
        biggest = np.abs(x).max(axis=0)
        column = int(biggest.argmax())
        if biggest[column] > UNSCALED:
            found.append(
                f"{where}: features reach {biggest[column]:.4g} (column {column}): scale them "
                f"(e.g. to zero mean and unit variance) or training will saturate and crawl"
            )
    return found

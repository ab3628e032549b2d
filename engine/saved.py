"""A trained model as a user holds it: loaded from a run, asked for predictions.

``model.npz`` carries, beside the arrays, a description (JSON, no pickle):
the run config it was trained with and the task it solves, so the file
stands alone. :func:`load` takes the file or the run directory that holds
it and returns a :class:`TrainedModel` with the scikit-learn verbs:
``predict``, ``predict_proba``, ``score``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import metrics
from .config import RunConfig
from .errors import ConfigError
from .model import load_params, predict, read_description, save_params

__all__ = ["MODEL_FILE", "TrainedModel", "describe", "load", "model_path", "save"]

#: The model's file in a run directory.
MODEL_FILE = "model.npz"

#: The description's format; a newer one is refused, not misread.
FORMAT = 1


def describe(config: RunConfig, task: str) -> dict:
    """What a saved model carries beside its arrays.

    Args:
        config: the run config the model was trained with.
        task: :data:`~dbnode.metrics.CLASSIFICATION` or
            :data:`~dbnode.metrics.REGRESSION`.

    Returns:
        ``{"format", "task", "config"}``, JSON-able. The config leaves out
        ``[cluster]`` (host names and the secret's path): a model file may
        travel where those should not.
    """
    described = {k: v for k, v in config.to_dict().items() if k != "cluster"}
    return {"format": FORMAT, "task": task, "config": described}


def save(path: str | Path, params: dict[str, np.ndarray], config: RunConfig, task: str) -> None:
    """Write a model that stands alone: its arrays and its description.

    Args:
        path: the ``.npz`` file.
        params: the parameters.
        config: the run config the model was trained with.
        task: the task it solves.

    Raises:
        OSError: the file cannot be written.
    """
    save_params(path, params, describe(config, task))


def model_path(path: str | Path) -> Path:
    """The model file a user names: a run directory's ``model.npz``, or the file.

    Args:
        path: a run directory or an ``.npz``.

    Returns:
        The file's path.

    Raises:
        ConfigError: nothing there, or a directory with no model in it.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / MODEL_FILE).is_file():
            raise ConfigError("model", str(path), f"is a directory without {MODEL_FILE}")
        return path / MODEL_FILE
    if not path.is_file():
        raise ConfigError("model", str(path), "no such file or run directory")
    return path


class TrainedModel:
    """A trained network with its run config: predictions and scores.

    Args:
        config: the run config it was trained with.
        params: its parameters (checked against ``config``).
        task: the task it solves (:func:`dbnode.metrics.task_of` of its
            training targets).

    Raises:
        ValueError: an unknown task.

    Attributes:
        config: the run config.
        spec: the network (:class:`~dbnode.model.ModelSpec`).
        params: name -> array.
        task: :data:`~dbnode.metrics.CLASSIFICATION` or
            :data:`~dbnode.metrics.REGRESSION`.
        classes: the number of classes (classifiers), else 0.
    """

    def __init__(self, config: RunConfig, params: dict[str, np.ndarray], task: str):
        metrics.metric_names(task)  # an unknown task is refused here
        self.config, self.spec, self.params, self.task = config, config.spec(), params, task
        self.classes = metrics.class_count(self.spec) if task == metrics.CLASSIFICATION else 0

    def __repr__(self) -> str:
        return f"TrainedModel(layers={list(self.spec.layers)}, task={self.task!r})"

    def _inputs(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim == 1:  # as training read it: one feature per row, or one example
            x = x[:, None] if self.spec.layers[0] == 1 else x[None, :]
        if x.ndim != 2 or x.shape[1] != self.spec.layers[0]:
            raise ValueError(
                f"X has shape {x.shape}: the model takes (examples, {self.spec.layers[0]})"
            )
        return x

    def outputs(self, x) -> np.ndarray:
        """The network's raw outputs.

        Args:
            x: inputs, ``(examples, features)``.

        Returns:
            ``(examples, outputs)`` of the model's dtype.

        Raises:
            ValueError: ``x`` is not ``features`` wide.
        """
        return predict(self.spec, self.params, self._inputs(x))

    def predict(self, x) -> np.ndarray:
        """The class of each example (classifiers) or its predicted value.

        Args:
            x: inputs, ``(examples, features)``.

        Returns:
            An int label per example, or the values: ``(examples,)`` for
            one output, ``(examples, outputs)`` for several.

        Raises:
            ValueError: ``x`` is not ``features`` wide.
        """
        out = self.outputs(x)
        if self.task == metrics.CLASSIFICATION:
            return metrics.predicted_labels(self.spec, out)
        return out[:, 0] if out.shape[1] == 1 else out

    def predict_proba(self, x) -> np.ndarray:
        """Class probabilities, one column per class (classifiers only).

        Args:
            x: inputs, ``(examples, features)``.

        Returns:
            ``(examples, classes)`` float64.

        Raises:
            ValueError: a regressor, or ``x`` not ``features`` wide.
        """
        if self.task != metrics.CLASSIFICATION:
            raise ValueError("predict_proba: a regression model has no class probabilities")
        return metrics.probabilities(self.spec, self.outputs(x))

    def evaluate(self, x, y) -> dict[str, float]:
        """Every figure of the model's task on ``(x, y)``.

        Args:
            x: inputs.
            y: their targets.

        Returns:
            As :func:`dbnode.metrics.evaluate`.

        Raises:
            ValueError: no examples, or shapes that do not fit.
        """
        return metrics.scores(self.spec, self.outputs(x), np.asarray(y), self.task)

    def score(self, x, y) -> float:
        """Accuracy (classifiers) or R² (regressors), as scikit-learn scores.

        Args:
            x: inputs.
            y: their targets.

        Returns:
            The figure; higher is better.

        Raises:
            ValueError: no examples, or shapes that do not fit.
        """
        figures = self.evaluate(x, y)
        return figures["accuracy" if self.task == metrics.CLASSIFICATION else "r2"]


def load(path: str | Path, config: RunConfig | None = None) -> TrainedModel:
    """A saved model, from its file or from the run directory that holds it.

    A file written before models carried their description needs its run
    config: ``config``, or the ``summary.json`` beside it.

    Args:
        path: a run directory or a ``model.npz``.
        config: the run config, for a file without a description.

    Returns:
        The model.

    Raises:
        ConfigError: no model there, no config for it, or arrays that do
            not fit the config.
    """
    path = model_path(path)
    try:
        description = read_description(path)
    except ValueError as exc:
        raise ConfigError("model", str(path), str(exc)) from None
    task = None
    if description is not None:
        if description.get("format", 0) > FORMAT:
            raise ConfigError(
                "model", str(path), "was written by a newer dbnode: upgrade to read it"
            )
        config = config or RunConfig.from_dict(description["config"])
        task = description.get("task")
    if config is None:
        config = _config_beside(path)
    spec = config.spec()
    try:
        params = load_params(path, spec)
    except ValueError as exc:
        raise ConfigError("model", str(path), str(exc)) from None
    if task is None:
        task = metrics.CLASSIFICATION if spec.output != "linear" else metrics.REGRESSION
    return TrainedModel(config, params, task)


def _config_beside(path: Path) -> RunConfig:
    summary = path.with_name("summary.json")
    try:
        return RunConfig.from_dict(json.loads(summary.read_text())["config"])
    except FileNotFoundError:
        raise ConfigError(
            "model", str(path), "holds weights only and has no summary.json beside it: "
            "pass the run config it was trained with",
        ) from None  # fmt: skip
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError("model", str(summary), f"cannot be read: {exc}") from None

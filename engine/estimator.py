"""scikit-learn-style estimators over :func:`dbnode.train`.

``dbnode.Classifier`` and ``dbnode.Regressor`` take a network's shape and
a run's pace as constructor parameters, and ``fit(X, y)`` trains it with
Downpour SGD -- on an embedded local cluster, or on ``hosts``. They follow
scikit-learn's conventions (parameters stored as given, fitted attributes
ending in ``_``, ``get_params``/``set_params``), so they work in its
pipelines and ``GridSearchCV``; with scikit-learn installed they are its
``BaseEstimator`` and classifier/regressor mixins too (which give them its
tags and HTML repr), without it they stand alone.

This module sits above the driver: it only turns parameters into a
:class:`~dbnode.config.RunConfig` and arrays into a run.
"""

from __future__ import annotations

import inspect
import tempfile
from typing import Any

import numpy as np

from .config import RunConfig
from .driver.run import train
from .metrics import r2
from .saved import load

__all__ = ["Classifier", "Regressor"]

try:  # scikit-learn is optional: its base classes and input checks when it is there
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
    from sklearn.utils.multiclass import check_classification_targets
    from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data
except ImportError:  # pragma: no cover - exercised without scikit-learn (or before 1.6)
    BaseEstimator = ClassifierMixin = RegressorMixin = object
    validate_data = None


class _Network(BaseEstimator):
    """What both estimators share: parameters -> run config -> trained model."""

    _output = ""  # the output layer
    _loss = ""

    def __init__(
        self,
        hidden: tuple[int, ...] = (64,),
        activation: str = "relu",
        epochs: int = 10,
        batch_size: int = 32,
        optimizer: str = "adam",
        learning_rate: float = 0.01,
        replicas: int = 1,
        partitions: int = 1,
        n_fetch: int = 1,
        n_push: int = 1,
        validation_fraction: float = 0.0,
        dtype: str = "float32",
        seed: int = 0,
        hosts: tuple[str, ...] | None = None,
        secret_file: str | None = None,
        settings: tuple[str, ...] = (),
    ):
        self.hidden = hidden
        self.activation = activation
        self.epochs = epochs
        self.batch_size = batch_size
        self.optimizer = optimizer
        self.learning_rate = learning_rate
        self.replicas = replicas
        self.partitions = partitions
        self.n_fetch = n_fetch
        self.n_push = n_push
        self.validation_fraction = validation_fraction
        self.dtype = dtype
        self.seed = seed
        self.hosts = hosts
        self.secret_file = secret_file
        self.settings = settings

    # scikit-learn's BaseEstimator gives these; without it, the same rule:
    # the parameters are the constructor's arguments, stored as given.
    @classmethod
    def _get_param_names(cls) -> list[str]:
        signature = inspect.signature(_Network.__init__)
        return sorted(p for p in signature.parameters if p != "self")

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The estimator's parameters (scikit-learn's convention).

        Args:
            deep: ignored (no parameter is itself an estimator).

        Returns:
            Name -> value, as given to the constructor or :meth:`set_params`.
        """
        return {name: getattr(self, name) for name in self._get_param_names()}

    def set_params(self, **params: Any):
        """Change parameters (scikit-learn's convention).

        Args:
            params: name -> new value.

        Returns:
            The estimator.

        Raises:
            ValueError: an unknown parameter.
        """
        names = self._get_param_names()
        for name, value in params.items():
            if name not in names:
                raise ValueError(
                    f"{type(self).__name__} has no parameter {name!r}; it takes {', '.join(names)}"
                )
            setattr(self, name, value)
        return self

    def _config(self, features: int, outputs: int) -> RunConfig:
        hidden = [int(h) for h in np.atleast_1d(self.hidden)] if self.hidden is not None else []
        cluster: dict[str, Any] = {}
        if self.hosts:
            cluster["hosts"] = [self.hosts] if isinstance(self.hosts, str) else list(self.hosts)
        if self.secret_file:
            cluster["secret_file"] = str(self.secret_file)
        return RunConfig.from_dict(
            {
                "model": {
                    "layers": [features, *hidden, outputs],
                    "activation": self.activation,
                    "output": self._output,
                    "loss": self._loss,
                    "dtype": self.dtype,
                    "init": "he" if self.activation == "relu" else "xavier",
                    "partitions": self.partitions,
                },
                "data": {"test_fraction": self.validation_fraction},
                "train": {
                    "replicas": self.replicas,
                    "epochs": self.epochs,
                    "batch_size": self.batch_size,
                    "n_fetch": self.n_fetch,
                    "n_push": self.n_push,
                    "seed": self.seed,
                },
                "optimizer": {"name": self.optimizer, "learning_rate": self.learning_rate},
                "cluster": cluster,
            },
            list(self.settings),
        )

    def _fit(self, x: np.ndarray, targets: np.ndarray, outputs: int):
        config = self._config(x.shape[1], outputs)
        # The run's files are read back and dropped: the model lives on in
        # the estimator (keep a run's files with dbnode.train(out_dir=...)).
        with tempfile.TemporaryDirectory(prefix="dbnode-fit-") as out:
            self.summary_ = train(config, out_dir=out, x=x, y=targets)
            self.model_ = load(out)
        self.history_ = self.summary_.history
        return self

    def _training_data(self, X, y, classes: bool) -> tuple[np.ndarray, np.ndarray]:
        """``(X, y)`` checked as scikit-learn checks them (its own checks
        and messages when it is installed); sets ``n_features_in_``."""
        if validate_data is not None:
            x, y = validate_data(self, X, y, dtype=np.float64, multi_output=not classes,
                                 y_numeric=not classes)  # fmt: skip
            if classes:
                y = column_or_1d(y, warn=True)
                check_classification_targets(y)
            return x, y
        x, y = _matrix(X), np.asarray(y)
        if len(y) != len(x):
            raise ValueError(f"X has {len(x)} rows but y has {len(y)}")
        self.n_features_in_ = x.shape[1]
        return x, (y.reshape(-1) if classes and y.ndim == 2 and y.shape[1] == 1 else y)

    def _inputs(self, X) -> np.ndarray:
        """``X`` to predict from, checked against what ``fit`` saw."""
        if validate_data is not None:
            check_is_fitted(self, "model_")
            return validate_data(self, X, dtype=np.float64, reset=False)
        if not hasattr(self, "model_"):
            raise AttributeError(
                f"This {type(self).__name__} instance is not fitted yet: call 'fit' first."
            )
        x = _matrix(X)
        if x.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {x.shape[1]} features, but {type(self).__name__} is expecting "
                f"{self.n_features_in_} features as input"
            )
        return x


def _matrix(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"Expected a 2D array of (examples, features), got shape {x.shape}")
    if len(x) == 0:
        raise ValueError("Found array with 0 sample(s) while a minimum of 1 is required")
    if not np.isfinite(x).all():
        raise ValueError("Input X contains NaN or infinity")
    return x


class Classifier(ClassifierMixin, _Network):
    """A feed-forward classifier trained by Downpour SGD (softmax output,
    cross-entropy loss), with scikit-learn's interface.

    Args:
        hidden: hidden layer sizes.
        activation: of the hidden layers (``relu``, ``tanh``, ``sigmoid``, ``linear``).
        epochs, batch_size: passes over each replica's data, examples per step.
        optimizer, learning_rate: ``adam`` (the default: forgiving of scale),
            ``sgd``, ``momentum`` or ``adagrad``, and its step.
        replicas, partitions: model replicas, and layer partitions of each.
        n_fetch, n_push: fetch / push every this many steps.
        validation_fraction: part of ``X`` held out for the held-out curve
            in ``history_`` (0: none; every example trains).
        dtype: ``float32`` or ``float64``.
        seed: initialisation and data order.
        hosts: running ``dbnode serve`` nodes (``"host:port"``); None: an
            embedded local cluster for each fit.
        secret_file: the cluster's secret, for ``hosts``.
        settings: any other run config keys, as ``"section.key=value"``.

    Attributes:
        classes_: the class labels seen in ``fit``, in order.
        model_: the trained :class:`~dbnode.saved.TrainedModel`.
        history_: the learning curve, one dict per evaluation (``metrics.csv``'s rows).
        summary_: the run's :class:`~dbnode.driver.outputs.Summary`.
        n_features_in_: input features.
    """

    _output, _loss = "softmax", "cross_entropy"

    def fit(self, X, y):
        """Train on ``X`` (``(examples, features)``) and class labels ``y``.

        Args:
            X: the inputs.
            y: one label per example (any sortable values).

        Returns:
            The fitted estimator.

        Raises:
            ValueError: bad shapes, fewer than two classes, or non-finite inputs.
            dbnode.ConfigError, dbnode.DBNodeError: the run could not start or failed.
        """
        x, y = self._training_data(X, y, classes=True)
        self.classes_, labels = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"fit needs two classes or more, got one class: {self.classes_[0]!r}")
        return self._fit(x, labels, len(self.classes_))

    def predict(self, X) -> np.ndarray:
        """The class of each example.

        Args:
            X: the inputs.

        Returns:
            One of :attr:`classes_` per example.

        Raises:
            NotFittedError: before :meth:`fit` (AttributeError without scikit-learn).
            ValueError: ``X`` is not ``n_features_in_`` wide.
        """
        x = self._inputs(X)
        return self.classes_[self.model_.predict(x)]

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities, one column per class of :attr:`classes_`.

        Args:
            X: the inputs.

        Returns:
            ``(examples, classes)`` float64, rows summing to one.

        Raises:
            NotFittedError: before :meth:`fit`.
            ValueError: ``X`` is not ``n_features_in_`` wide.
        """
        x = self._inputs(X)
        return self.model_.predict_proba(x)

    def score(self, X, y, sample_weight=None) -> float:
        """Mean accuracy on ``(X, y)``.

        Args:
            X: the inputs.
            y: their labels.
            sample_weight: weights per example (None: equal).

        Returns:
            The (weighted) fraction predicted right.
        """
        hits = self.predict(X) == np.asarray(y)
        return float(np.average(hits, weights=sample_weight))


class Regressor(RegressorMixin, _Network):
    """A feed-forward regressor trained by Downpour SGD (linear output,
    squared error), with scikit-learn's interface.

    Takes the parameters of :class:`Classifier`.

    Attributes:
        model_: the trained :class:`~dbnode.saved.TrainedModel`.
        history_: the learning curve, one dict per evaluation.
        summary_: the run's summary.
        n_features_in_: input features.
    """

    _output, _loss = "linear", "squared_error"

    def __sklearn_tags__(self):  # scikit-learn's: several outputs are fine
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    def fit(self, X, y):
        """Train on ``X`` and targets ``y`` (one value, or one row, per example).

        Args:
            X: the inputs.
            y: ``(examples,)`` or ``(examples, outputs)`` targets.

        Returns:
            The fitted estimator.

        Raises:
            ValueError: bad shapes or non-finite values.
            dbnode.ConfigError, dbnode.DBNodeError: the run could not start or failed.
        """
        x, y = self._training_data(X, y, classes=False)
        y = np.asarray(y, dtype=np.float64)
        self._single = y.ndim == 1
        return self._fit(x, y, 1 if y.ndim == 1 else y.shape[1])

    def predict(self, X) -> np.ndarray:
        """The predicted value(s) of each example.

        Args:
            X: the inputs.

        Returns:
            ``(examples,)`` when fitted on one value per example, else
            ``(examples, outputs)``; float64.

        Raises:
            NotFittedError: before :meth:`fit`.
            ValueError: ``X`` is not ``n_features_in_`` wide.
        """
        x = self._inputs(X)
        out = np.asarray(self.model_.outputs(x), dtype=np.float64)
        return out[:, 0] if self._single else out

    def score(self, X, y, sample_weight=None) -> float:
        """The coefficient of determination R² on ``(X, y)``.

        Args:
            X: the inputs.
            y: their targets.
            sample_weight: weights per example (None: equal).

        Returns:
            R², averaged over outputs; 1 is perfect.
        """
        t = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
        return r2(t, self.predict(X).reshape(len(t), -1), sample_weight)

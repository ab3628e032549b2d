"""In-memory arrays and the scikit-learn-style estimators, trained for real
(one embedded cluster shared by the module's fits; its nodes are real
processes on loopback)."""

import warnings

import numpy as np
import pytest

import dbnode
from dbnode import RunConfig
from dbnode.driver import LocalCluster
from dbnode.errors import ConfigError

sklearn = pytest.importorskip("sklearn")
from sklearn.datasets import load_iris  # noqa: E402
from sklearn.model_selection import GridSearchCV, cross_val_score  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import check_estimator  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(2) as local:
        yield {"hosts": [f"{h}:{p}" for h, p in local.addresses],
               "secret_file": str(local.secret_file)}  # fmt: skip


@pytest.fixture(scope="module")
def iris():
    x, y = load_iris(return_X_y=True)
    return StandardScaler().fit_transform(x), np.array(["setosa", "versicolor", "virginica"])[y]


def test_train_takes_arrays_and_holds_out_a_tenth_of_them(cluster, iris):
    x, y = iris
    config = RunConfig.from_dict({
        "model": {"layers": [4, 16, 3], "activation": "relu", "output": "softmax",
                  "loss": "cross_entropy", "init": "he"},
        "train": {"epochs": 40, "batch_size": 8},
        "optimizer": {"name": "adam", "learning_rate": 0.01},
        "cluster": cluster,
    })  # fmt: skip
    labels = np.unique(y, return_inverse=True)[1]
    summary = dbnode.train(config, x=x, y=labels)
    assert summary.examples == 40 * 135 and summary.test["accuracy"] >= 0.85
    held = dbnode.train(config, x=x, y=labels, x_test=x[:30], y_test=labels[:30])
    assert held.examples == 40 * 150  # a given test set: every example trains
    with pytest.raises(ConfigError, match="together"):
        dbnode.train(config, x=x)
    with pytest.raises(ConfigError, match="data.train.*pass arrays"):
        dbnode.train(config)
    with pytest.raises(ConfigError, match="NaN"):
        dbnode.train(config, x=np.full((4, 4), np.nan), y=np.zeros(4))


def test_a_classifier_fits_predicts_its_own_labels_and_keeps_a_history(cluster, iris):
    x, y = iris
    clf = dbnode.Classifier(hidden=(16,), epochs=40, batch_size=8, optimizer="adam",
                            learning_rate=0.01, validation_fraction=0.2, **cluster)  # fmt: skip
    assert clf.fit(x, y) is clf
    assert set(clf.predict(x)) <= set(clf.classes_) and clf.score(x, y) >= 0.9
    proba = clf.predict_proba(x[:5])
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    assert list(clf.classes_[proba.argmax(axis=1)]) == list(clf.predict(x[:5]))
    assert clf.history_ and "test_accuracy" in clf.history_[-1]
    assert clf.n_features_in_ == 4 and clf.model_.spec.layers == (4, 16, 3)


def test_a_regressor_fits_values_and_is_scored_by_r2(cluster):
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (400, 3))
    y = 3 * x[:, 0] - 2 * x[:, 1] + 50  # far from 0, as real targets are
    reg = dbnode.Regressor(hidden=(16,), activation="tanh", epochs=60, batch_size=16,
                           optimizer="adam", learning_rate=0.05, **cluster)  # fmt: skip
    reg.fit(x, y)
    assert reg.predict(x).shape == (400,) and reg.score(x, y) > 0.9
    two = dbnode.Regressor(epochs=5, **cluster).fit(x, np.column_stack([y, -y]))
    assert two.predict(x).shape == (400, 2)


def test_estimators_work_in_pipelines_and_grid_search(cluster, iris):
    x, y = iris
    pipe = make_pipeline(
        StandardScaler(), dbnode.Classifier(epochs=20, batch_size=8, optimizer="adam", **cluster)
    )
    search = GridSearchCV(pipe, {"classifier__learning_rate": [0.001, 0.02]}, cv=3).fit(x, y)
    assert search.best_params_ == {"classifier__learning_rate": 0.02}
    assert (
        cross_val_score(
            dbnode.Classifier(
                epochs=20, batch_size=8, optimizer="adam", learning_rate=0.02, **cluster
            ),
            x,
            y,
            cv=3,
        ).mean()
        > 0.8
    )
    clf = dbnode.Classifier(**cluster)
    assert clf.set_params(epochs=3).get_params()["epochs"] == 3
    with pytest.raises(ValueError, match="no parameter 'epoch'"):
        clf.set_params(epoch=3)


# float32 GEMMs round differently with the batch they compute in: a row
# predicted alone and in a batch may differ in the last bits (1e-7 rel).
SUBSET = {"check_methods_subset_invariance": "float32 BLAS: last-bit differences by batch size"}


@pytest.mark.parametrize("make", [dbnode.Classifier, dbnode.Regressor])
def test_scikit_learns_estimator_checks_pass(cluster, make):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(make(**cluster), expected_failed_checks=SUBSET, on_fail=None)
    failed = [(r["check_name"], str(r["exception"])[:300]) for r in results
              if r["status"] == "failed"]  # fmt: skip
    assert not failed, failed
    assert sum(r["status"] == "passed" for r in results) >= 45

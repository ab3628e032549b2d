"""Optimizers: each class checks its own settings, round-trips its wire
form, and is all that the config, the shard and the trainer need of it."""

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest

from dbnode import optim
from dbnode.config import RunConfig
from dbnode.errors import ConfigError, ShardError
from dbnode.ps.shard import ParameterShard

BASE = {"model": {"layers": [2, 1]}, "data": {"train": "xor:10"}}


def config_with(**optimizer):
    return RunConfig.from_dict({**BASE, "optimizer": optimizer})


@pytest.mark.parametrize("name", sorted(optim.OPTIMIZERS))
def test_each_optimizer_round_trips_its_wire_form(name):
    opt = optim.make_optimizer(name, 0.25)
    wire = opt.to_wire()
    assert wire["name"] == name and wire["learning_rate"] == 0.25
    assert set(wire) == {"name", "learning_rate", *optim.settings_of(name)}
    assert optim.from_wire(wire) == opt
    assert all(type(v) is float for k, v in wire.items() if k != "name")


def test_the_config_section_is_the_optimizer():
    config = config_with(name="momentum", learning_rate=1, momentum=0.5)
    assert config.optimizer == optim.Momentum(1.0, 0.5)
    assert config.to_dict()["optimizer"] == {
        "name": "momentum",
        "learning_rate": 1.0,
        "momentum": 0.5,
    }
    assert RunConfig.from_dict(config.to_dict()) == config
    assert RunConfig.from_dict(BASE).optimizer == optim.SGD(0.01)  # the default


@pytest.mark.parametrize(
    ("optimizer", "key", "words"),
    [
        ({"name": "nadam"}, "optimizer.name", "adagrad, adam, momentum, sgd"),
        ({"name": "adam", "beta2": 1.0}, "optimizer.beta2", "[0, 1)"),
        ({"name": "adam", "eps": -1}, "optimizer.eps", "> 0"),
        ({"learning_rate": -1}, "optimizer.learning_rate", "> 0"),
        ({"learning_rate": float("nan")}, "optimizer.learning_rate", "finite"),
        ({"learning_rate": "fast"}, "optimizer.learning_rate", "number"),
        ({"momentum": 0.5}, "optimizer.momentum", "unknown setting for sgd"),
        ({"name": "momentum", "momentum": 1.0}, "optimizer.momentum", "[0, 1)"),
        ({"name": "momentum", "momentum": True}, "optimizer.momentum", "number"),
        ({"name": "adagrad", "eps": 0}, "optimizer.eps", "> 0"),
        ({"name": "adagrad", "beta": 0.9}, "optimizer.beta", "learning_rate, eps"),
    ],
)
def test_bad_settings_name_the_key_and_what_is_allowed(optimizer, key, words):
    with pytest.raises(ConfigError) as err:
        config_with(**optimizer)
    assert err.value.key == key and words in str(err.value)


def test_a_shard_refuses_a_bad_optimizer_with_the_reason():
    shard = ParameterShard()
    with pytest.raises(ShardError, match=r"optimizer\.momentum.*unknown setting for sgd"):
        shard.init(
            1,
            "w",
            np.zeros(3, np.float32),
            optimizer={"name": "sgd", "learning_rate": 0.1, "momentum": 0.9},
        )
    with pytest.raises(ShardError, match="mapping with 'name' and 'learning_rate'"):
        shard.init(1, "w", np.zeros(3, np.float32), optimizer=["sgd"])
    assert shard.keys() == []


@dataclass(frozen=True)
class HalfStep(optim.SGD):
    """A new optimizer, written as the architecture says: one class."""

    scale: float = 0.5
    name: ClassVar[str] = "half_step"

    def apply(self, param, grad, state, step=1):
        param -= (self.learning_rate * self.scale) * grad


def test_a_new_optimizer_is_one_class(monkeypatch):
    monkeypatch.setitem(optim.OPTIMIZERS, HalfStep.name, HalfStep)
    config = config_with(name="half_step", learning_rate=0.5, scale=0.25)
    shard = ParameterShard()
    shard.init(1, "w", np.ones(4, np.float32), optimizer=config.optimizer.to_wire())
    shard.push(1, np.ones(4, np.float32))
    assert np.allclose(shard.pull(1).value, 1 - 0.5 * 0.25)
    assert shard.stats()["tensors"][0]["optimizer"] == config.optimizer.to_wire()


def textbook_adam(w, grads, lr, b1=0.9, b2=0.999, eps=1e-8):
    """Algorithm 1 of Kingma & Ba, in float64, one step per gradient."""
    m = v = np.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        w = w - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return w


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adam_on_a_shard_counts_each_pieces_updates_as_the_textbook_does(dtype):
    rng = np.random.default_rng(3)
    w0 = rng.normal(size=(6, 5))
    grads = [rng.normal(size=(6, 5)) * 10.0**k for k in (-3, 0, 2, 0, -1)]
    want = textbook_adam(w0, grads, lr=0.01)
    shard = ParameterShard()
    opt = optim.Adam(0.01)
    shard.init(1, "w", w0.astype(dtype), optimizer=opt.to_wire())
    for g in grads:
        shard.push(1, g.astype(dtype))
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(shard.pull(1).value, want, rtol=rtol, atol=rtol * 1e-2)
    # The first step moves every weight by lr, whatever the gradient's scale.
    first = shard_after_one(w0.astype(dtype), grads[2].astype(dtype), opt)
    np.testing.assert_allclose(np.abs(first - w0), 0.01, rtol=1e-3)


def shard_after_one(w, g, opt):
    shard = ParameterShard()
    shard.init(1, "w", w, optimizer=opt.to_wire())
    shard.push(1, g)
    return shard.pull(1).value

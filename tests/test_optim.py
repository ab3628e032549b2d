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

    def apply(self, param, grad, state, step=1, scale=1.0):
        param -= (self.learning_rate * self.scale * scale) * grad


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


def test_schedules_are_functions_of_the_update_count():
    step = optim.Schedule("step", every=3, factor=0.5)
    assert [step.factor_at(t) for t in range(1, 8)] == [1, 1, 1, 0.5, 0.5, 0.5, 0.25]
    cosine = optim.Schedule("cosine", total=4, min_factor=0.2)
    got = [cosine.factor_at(t) for t in (1, 3, 5, 9)]
    np.testing.assert_allclose(got, [1.0, 0.6, 0.2, 0.2])
    assert optim.Schedule("plateau").factor_at(100) == 1.0
    for bad, key in [({"name": "warm"}, "schedule.name"), ({"name": "step"}, "schedule.every"),
                     ({"factor": 0}, "schedule.factor"), ({"min_factor": 2}, "schedule.min_factor"),
                     ({"total": "x"}, "schedule.total")]:  # fmt: skip
        with pytest.raises(ConfigError) as err:
            optim.Schedule(**bad)
        assert err.value.key == key


def test_a_scheduled_optimizer_round_trips_and_a_shard_keeps_its_schedule_and_scale(tmp_path):
    wire = {"name": "sgd", "learning_rate": 1.0, "schedule": {"name": "step", "every": 2}}
    opt = optim.from_wire(wire)
    assert isinstance(opt, optim.Scheduled) and optim.from_wire(opt.to_wire()) == opt
    shard = ParameterShard()
    shard.init(1, "w", np.zeros(1), optimizer=wire)
    for _ in range(4):  # rates 1, 1, 0.1, 0.1
        shard.push(1, np.ones(1))
    assert shard.pull(1).value[0] == pytest.approx(-2.2)
    shard.set_scale(0.5)  # reduce-on-plateau, on top of the schedule: 0.01 * 0.5
    shard.push(1, np.ones(1))
    assert shard.pull(1).value[0] == pytest.approx(-2.205)
    back = ParameterShard.restore(shard.snapshot(tmp_path / "s.npz"))
    assert back.stats()["tensors"][0]["scale"] == 0.5
    assert back.stats()["tensors"][0]["optimizer"] == opt.to_wire()
    with pytest.raises(ShardError, match="scale"):
        shard.set_scale(0.0)


def test_a_resumed_shard_takes_the_new_schedule_and_keeps_its_state():
    shard = ParameterShard()
    wire = {"name": "adam", "learning_rate": 0.1, "schedule": {"name": "cosine", "total": 2}}
    shard.init(1, "w", np.ones(3), optimizer=wire)
    shard.push(1, np.ones(3))
    shard.push(1, np.ones(3))
    state = {k: v.copy() for k, v in shard._tensors[1].state.items()}
    shard.set_schedule({"name": "cosine", "total": 4.0})
    assert shard.stats()["tensors"][0]["optimizer"]["schedule"]["total"] == 4.0
    assert all(np.array_equal(state[k], shard._tensors[1].state[k]) for k in state)
    shard.set_schedule(None)
    assert "schedule" not in shard.stats()["tensors"][0]["optimizer"]
    assert shard.scale() == 1.0

"""Run configuration: TOML, overrides, and errors that name the key."""

import dataclasses

import pytest

from dbnode.config import RunConfig, format_address, parse_address, parse_override
from dbnode.errors import ConfigError

XOR = """
[model]
layers = [2, 2, 1]
activation = "sigmoid"

[data]
train = "xor:50000"

[train]
examples_per_replica = 2000
seed = 3

[optimizer]
name = "sgd"
learning_rate = 0.5
"""


def test_load_and_override(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(XOR)
    config = RunConfig.load(
        path, ["train.seed=7", "model.layers=[2, 3, 1]", "optimizer.learning_rate=1"]
    )
    assert config.model.layers == (2, 3, 1)
    assert config.train.seed == 7 and config.train.batch_size == 1
    assert config.optimizer.learning_rate == 1.0 and isinstance(
        config.optimizer.learning_rate, float
    )
    assert config.data.train == "xor:50000"  # built-in names are not paths
    assert config.replicas_for(50_000) == 25  # the original's 25 replicas
    assert config.spec().layers == (2, 3, 1)
    assert RunConfig.from_dict(config.to_dict()) == config


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        '[model]\nlayers = [4, 2]\ninit = "w.npz"\n[data]\ntrain = "d/train.csv"\n'
        '[cluster]\nsecret_file = "s.key"\n'
    )
    config = RunConfig.load(path)
    assert config.data.train == str(tmp_path / "d/train.csv")
    assert config.model.init == str(tmp_path / "w.npz")
    assert config.cluster.secret_file == str(tmp_path / "s.key")


BASE = {"model": {"layers": [2, 1]}, "data": {"train": "xor:10"}}


def test_overridden_paths_are_taken_from_the_working_directory(tmp_path, monkeypatch):
    """A path typed on the command line means what it means where it was typed."""
    (tmp_path / "configs").mkdir()
    path = tmp_path / "configs" / "run.toml"
    path.write_text('[model]\nlayers = [2, 1]\n[data]\ntrain = "in_file.csv"\n')
    monkeypatch.chdir(tmp_path)
    config = RunConfig.load(path, ["data.test=typed.csv"])
    assert config.data.train == str(tmp_path / "configs" / "in_file.csv")
    assert config.data.test == "typed.csv"
    # A file that leaves a required key to the command line still loads.
    path.write_text("[model]\nlayers = [2, 1]\n")
    assert RunConfig.load(path, ["data.train=x.csv"]).data.train == "x.csv"


def with_(section, **values):
    """BASE with keys of one section replaced (_drop=True empties it first)."""
    raw = {name: dict(keys) for name, keys in BASE.items()}
    if values.pop("_drop", False):
        raw[section] = {}
    raw.setdefault(section, {}).update(values)
    return raw


@pytest.mark.parametrize(
    "raw,key",
    [
        ({**BASE, "modle": {}}, "modle"),
        (with_("model", size=3), "model.size"),
        (with_("model", layers="2,1"), "model.layers"),
        (with_("model", layers=[2, 1.5]), r"model.layers\[1\]"),
        (with_("model", activation="swish"), "model.activation"),
        (with_("model", partitions=2), "model.partitions"),
        (with_("model", layers=[2, 0]), "model"),
        (with_("model", _drop=True), "model.layers"),
        (with_("data", test_fraction=1.0), "data.test_fraction"),
        (with_("train", batch_size=0), "train.batch_size"),
        (with_("train", batch_size=True), "train.batch_size"),
        (with_("train", replicas=2, examples_per_replica=10), "train.replicas"),
        (with_("optimizer", learning_rate=-1), "optimizer.learning_rate"),
        (with_("optimizer", learning_rate="fast"), "optimizer.learning_rate"),
        (with_("optimizer", name="nadam"), "optimizer.name"),
        (with_("cluster", hosts=["localhost"]), "cluster.hosts"),
        (with_("cluster", parameter_shards=-1), "cluster.parameter_shards"),
        (with_("wire", push="int8"), "wire.push"),
        (with_("wire", fech="bf16"), "wire.fech"),
        (
            {**with_("wire", activations="f16"), "model": {"layers": [2, 1], "dtype": "float64"}},
            "wire.activations",
        ),
    ],
)
def test_bad_values_name_their_key(raw, key):
    with pytest.raises(ConfigError, match=f"^{key}"):
        RunConfig.from_dict(raw)


def test_config_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.toml.*file not found"):
        RunConfig.load(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("[model\nlayers = ")
    with pytest.raises(ConfigError, match="bad.toml.*not valid TOML"):
        RunConfig.load(tmp_path / "bad.toml")


def test_overrides():
    assert parse_override("train.seed=3") == ("train", "seed", 3)
    assert parse_override("model.layers=[1, 2]") == ("model", "layers", [1, 2])
    assert parse_override("data.train=xor:100") == ("data", "train", "xor:100")
    assert parse_override('model.output="softmax"') == ("model", "output", "softmax")
    for bad in ("seed=3", "train.seed", ".seed=1", "train.=1"):
        with pytest.raises(ConfigError, match="override"):
            parse_override(bad)


def test_addresses():
    assert parse_address("127.0.0.1:7070") == ("127.0.0.1", 7070)
    assert parse_address("[::1]:0") == ("::1", 0)
    assert parse_address("node1", default_port=7070) == ("node1", 7070)
    assert parse_address("::1", default_port=7070) == ("::1", 7070)
    assert parse_address("fd13::1", default_port=7070) == ("fd13::1", 7070)
    assert parse_address("[fd13::1]", default_port=7070) == ("fd13::1", 7070)
    for bad in ("node1", "h:99999", ":80", "h:x", "::1", "[::1]x", "[]:80"):
        with pytest.raises(ConfigError, match="HOST:PORT"):
            parse_address(bad)
    assert format_address(("fd13::1", 7070)) == "[fd13::1]:7070"
    assert format_address(("10.0.0.5", 7070)) == "10.0.0.5:7070"
    for address in (("fd13::1", 1), ("h", 2)):
        assert parse_address(format_address(address)) == address


def test_wire_codecs_default_to_f32_and_take_16_bit_ones():
    assert dataclasses.asdict(RunConfig.from_dict(BASE).wire) == {
        "fetch": "f32", "push": "f32", "activations": "f32"
    }  # fmt: skip
    config = RunConfig.from_dict(BASE, ['wire.push="bf16"', 'wire.fetch="f16"'])
    assert (config.wire.fetch, config.wire.push, config.wire.activations) == ("f16", "bf16", "f32")
    assert RunConfig.from_dict(config.to_dict()) == config

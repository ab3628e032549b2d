"""The layout holds: public surfaces pinned, sans-IO modules free of trio and
sockets, layers that import only downward, no module over 800 lines, and the
socket fast path in use (with a loud fallback)."""

import ast
import functools
import importlib
import inspect
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import trio

from dbnode.wire import Connection, MessageKind, sockio

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "engine"

SURFACES = {
    "dbnode": [
        "Adagrad", "Adam", "Classifier", "ConfigError", "DBNodeError", "LayerStack", "LocalProtocolError", "ModelSpec",
        "Momentum", "ProtocolError", "Regressor", "RemoteProtocolError", "RunConfig", "SGD", "StopTraining",
        "Summary", "TrainResult", "TrainedModel", "Trainer", "__version__", "evaluate",
        "from_bias_first", "init_params", "load", "load_params", "make_optimizer", "plot", "predict",
        "save_params", "to_bias_first", "train",
    ],
    "dbnode.wire": [
        "Address", "BFLOAT16", "Channel", "Connection", "DEFAULT_LIMITS", "DEFER", "DType", "ErrorCode",
        "Frame", "FrameDecoder", "HANDSHAKE_LIMITS", "HEADER_SIZE", "Handler", "Header",
        "InlineHandler", "Limits", "MAGIC", "MAX_ERROR_TEXT", "MAX_NDIM", "MIN_SECRET_BYTES",
        "MessageKind", "NONCE_SIZE", "PROTOCOL_VERSION", "Peers", "Reply", "TENSOR_KINDS",
        "auth_mac", "client_handshake", "connect", "decode_header", "encode_frame", "error_frame",
        "load_secret", "open_connection", "parse_meta", "payload_view", "serve",
        "server_handshake",
    ],
    "dbnode.ps": ["ParameterClient", "ParameterShard", "Pulled"],
    "dbnode.driver": [
        "FailureDetector", "LocalCluster", "Progress", "Summary", "check_data", "dumps", "load_data",
        "new_run_dir", "plan", "prepare", "read_metrics", "status", "train", "write_outputs",
        "write_secret",
    ],
}  # fmt: skip

SANS_IO = ["dbnode.wire.frames", "dbnode.wire.decoder", "dbnode.wire.session",
           "dbnode.wire.secret", "dbnode.wire.reply", "dbnode.wire.admission",
           "dbnode.schema"]  # fmt: skip


def engine_modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(ENGINE.rglob("*.py")):
        parts = path.relative_to(ENGINE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append((".".join(("dbnode", *parts)), path))
    return out


@pytest.mark.parametrize("package", sorted(SURFACES))
def test_public_surface_is_pinned(package):
    module = importlib.import_module(package)
    assert module.__all__ == sorted(SURFACES[package])
    for name in module.__all__:
        assert getattr(module, name) is not None, name
        assert name in dir(module)


@pytest.mark.parametrize("name,path", engine_modules(), ids=lambda v: str(v))
def test_every_all_name_exists(name, path):
    if name.endswith("._buildinfo"):
        pytest.skip("build helper, run by setup.py")
    module = importlib.import_module(name)
    for export in getattr(module, "__all__", []):
        assert hasattr(module, export), f"{name}.__all__ names {export}, which is not there"


def test_public_names_have_docstrings():
    missing = []
    for package in SURFACES:
        module = importlib.import_module(package)
        for name in module.__all__:
            value = getattr(module, name)
            if (inspect.isclass(value) or inspect.isroutine(value)) and not (
                value.__doc__ or ""
            ).strip():
                missing.append(f"{package}.{name}")
    assert not missing, missing


def fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)  # fmt: skip


@pytest.mark.parametrize("modules", [SANS_IO + ["dbnode.errors"], ["dbnode"]])
def test_sans_io_and_the_package_import_without_trio_sockets_or_kernels(modules):
    out = fresh(
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + "print(sorted(m for m in ('trio', 'socket', 'dbnode._kernels', 'dbnode.kernels')"
        " if m in sys.modules))"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("module", SANS_IO)
def test_sans_io_modules_say_so(module):
    assert "sans-IO" in importlib.import_module(module).__doc__.splitlines()[0]


@pytest.mark.parametrize("name,path", engine_modules(), ids=lambda v: str(v))
def test_no_module_over_800_lines(name, path):
    assert len(path.read_text().splitlines()) <= 800


def dbnode_imports(name: str, path: Path) -> set[str]:
    """The dbnode modules ``path`` imports (resolved from relative imports)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("dbnode"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("dbnode"):
                if node.module:  # "from . import x" imports x, not the package
                    found.add(target)
                found.update(f"{target}.{a.name}" for a in node.names)
    return found


# Each layer may import only these (by module-name prefix), besides itself.
ALLOWED = {
    "dbnode.errors": [],
    "dbnode.wire": ["dbnode.errors", "dbnode._lazy", "dbnode.wire"],
    "dbnode.kernels": ["dbnode._buildinfo", "dbnode._kernels", "dbnode._target"],
    "dbnode.layers": ["dbnode.kernels"],
    "dbnode.model": ["dbnode.kernels", "dbnode.layers"],
    "dbnode.blocks": ["dbnode.kernels", "dbnode.model"],
    "dbnode.metrics": ["dbnode.kernels", "dbnode.model"],
    "dbnode.optim": ["dbnode.kernels", "dbnode.errors"],
    "dbnode.placement": ["dbnode.errors"],
    "dbnode.pipeline": [],
    "dbnode.turns": [],
    "dbnode.runs": ["dbnode.errors"],
    "dbnode.traffic": ["dbnode.errors", "dbnode.placement"],
    "dbnode.threads": ["dbnode.kernels"],
    "dbnode.codecs": ["dbnode.kernels", "dbnode.wire.frames"],
    "dbnode.ps": ["dbnode.errors", "dbnode.kernels", "dbnode.codecs", "dbnode.optim",
                  "dbnode.placement", "dbnode.durable", "dbnode.wire", "dbnode.control", "dbnode.runs", "dbnode._lazy",
                  "dbnode.ps"],
}  # fmt: skip
LOWER_THAN_SERVICES = ["dbnode.kernels", "dbnode.reference", "dbnode.optim", "dbnode.model",
                       "dbnode.layers", "dbnode.blocks", "dbnode.data", "dbnode.placement",
                       "dbnode.config", "dbnode.trainer", "dbnode.durable", "dbnode.traffic",
                       "dbnode.threads", "dbnode.partition_core", "dbnode.metrics",
                       "dbnode.saved", "dbnode.pipeline", "dbnode.turns"]  # fmt: skip
UPPER = ["dbnode.wire", "dbnode.codecs", "dbnode.ps", "dbnode.runs", "dbnode.node", "dbnode.partition",
         "dbnode.partition_sync",
         "dbnode.control", "dbnode.driver"]  # fmt: skip


def test_layers_import_only_downward():
    violations = []
    for name, path in engine_modules():
        imports = dbnode_imports(name, path) - {name}
        for layer, allowed in ALLOWED.items():
            if name == layer or name.startswith(layer + "."):
                bad = [
                    i for i in imports if not any(i == a or i.startswith(a + ".") for a in allowed)
                ]
                violations += [f"{name} imports {i}" for i in bad]
        if name in LOWER_THAN_SERVICES:
            violations += [f"{name} imports {i}" for i in imports
                           if any(i == u or i.startswith(u + ".") for u in UPPER)]  # fmt: skip
        if name.startswith("dbnode.wire.") and name.rpartition(".")[2] in (
            "frames",
            "decoder",
            "secret",
            "session",
            "reply",
            "admission",
        ):
            trio_side = ["sockio", "connection", "handshake", "channel", "endpoints", "peers"]
            violations += [f"{name} imports {i}" for i in imports
                           if any(i.startswith(f"dbnode.wire.{t}") for t in trio_side)]  # fmt: skip
        # Above the driver: the package's surface, and the estimators over train().
        if not name.startswith("dbnode.driver") and name not in (
            "dbnode",
            "dbnode.estimator",
            "dbnode.plot",
        ):
            violations += [f"{name} imports {i}" for i in imports if i.startswith("dbnode.driver")]
    assert not violations, violations


def test_cli_imports_public_names_only():
    for path in (ROOT / "cli").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dbnode"):
                assert not any(part.startswith("_") for part in node.module.split(".")), path
                for alias in node.names:
                    assert not alias.name.startswith("_"), f"{path}: {alias.name}"
                    module = importlib.import_module(node.module)
                    public = getattr(module, "__all__", None)
                    if public is not None and not hasattr(
                        importlib.import_module(node.module), "__path__"
                    ):
                        assert alias.name in public, f"{path}: {node.module}.{alias.name}"


# -- the socket fast path --------------------------------------------------------------


async def _loopback_pair(stream_type=trio.SocketStream):
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listeners[0].accept()
    await listeners[0].aclose()
    return client, server


async def test_socket_fast_path_is_in_use():
    client, server = await _loopback_pair()
    a, b = Connection(client), Connection(server)
    assert a._wire.fast and b._wire.fast
    await a.aclose()
    await b.aclose()


class _NoPrivateSocket:
    """A trio socket as a trio release without the private stdlib socket would have it."""

    def __init__(self, sock):
        self._inner = sock

    def __getattr__(self, name):
        if name == "_sock":
            raise AttributeError(name)
        return getattr(self._inner, name)


async def test_without_the_private_socket_the_fallback_warns_once_and_works(monkeypatch):
    monkeypatch.setattr(sockio, "_warned", False)
    client, server = await _loopback_pair()
    client.socket = _NoPrivateSocket(client.socket)
    with pytest.warns(RuntimeWarning, match="falls back"):
        slow = Connection(client)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Connection(client)  # once per process: no second warning
    assert not slow._wire.fast
    fast = Connection(server)
    slow.authenticated = fast.authenticated = True
    array = np.arange(50_000, dtype=np.float32)  # big enough to go straight into place
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(slow.send_frame, MessageKind.PUSH, key=3, array=array))
        frame = await fast.receive_frame()
    assert frame.key == 3 and np.array_equal(frame.array, array)
    await fast.send_frame(MessageKind.REPLY, request_id=1, array=array[:10])
    back = await slow.receive_frame()
    assert np.array_equal(back.array, array[:10])
    await slow.aclose()
    await fast.aclose()


def test_a_submodule_named_like_its_export_never_shadows_it():
    """dbnode.driver.status (the module) and its status() (the export): the
    export wins whichever name is asked for first."""
    out = fresh("from dbnode.driver import dumps, status\nprint(callable(status))")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"

"""dbnode: Downpour SGD on a cluster of plain CPU machines.

The public API is what ``__all__`` lists (pinned by tests/test_package.py);
everything else is internal. Compiled kernels are in :mod:`dbnode.kernels`,
the wire format in :mod:`dbnode.protocol`.
"""

from importlib.metadata import PackageNotFoundError, version as _version

from .config import RunConfig
from .driver import Summary, train
from .errors import ConfigError, DBNodeError, LocalProtocolError, ProtocolError, RemoteProtocolError
from .model import (LayerStack, ModelSpec, evaluate, from_bias_first, init_params, load_params,
                    predict, save_params, to_bias_first)
from .optim import SGD, Adagrad, Momentum, make_optimizer
from .trainer import Trainer, TrainResult

try:
    __version__ = _version("dbnode")
except PackageNotFoundError:  # pragma: no cover - only when run uninstalled
    __version__ = "0+unknown"

__all__ = [
    "Adagrad",
    "ConfigError",
    "DBNodeError",
    "LayerStack",
    "LocalProtocolError",
    "ModelSpec",
    "Momentum",
    "ProtocolError",
    "RemoteProtocolError",
    "RunConfig",
    "SGD",
    "Summary",
    "TrainResult",
    "Trainer",
    "__version__",
    "evaluate",
    "from_bias_first",
    "init_params",
    "load_params",
    "make_optimizer",
    "predict",
    "save_params",
    "to_bias_first",
    "train",
]

"""dbnode: Downpour SGD on a cluster of plain CPU machines.

The public API is what ``__all__`` lists (pinned by tests/test_package.py);
everything else is internal. Names are imported on first use, so that
``import dbnode.wire.frames`` and the other sans-IO modules load without
trio, sockets or the compiled kernels. The layers, bottom up, and what each
may import: docs/architecture.md.
"""

from ._lazy import lazy

_EXPORTS = {
    "RunConfig": ".config",
    "Summary": ".driver.outputs",
    "train": ".driver.run",
    **dict.fromkeys(
        [
            "ConfigError",
            "DBNodeError",
            "LocalProtocolError",
            "ProtocolError",
            "RemoteProtocolError",
            "StopTraining",
        ],
        ".errors",
    ),
    **dict.fromkeys(
        [
            "LayerStack",
            "ModelSpec",
            "from_bias_first",
            "init_params",
            "load_params",
            "predict",
            "save_params",
            "to_bias_first",
        ],
        ".model",
    ),
    "evaluate": ".metrics",
    "load": ".saved",
    "Classifier": ".estimator",
    "plot": ".plot",
    "Regressor": ".estimator",
    "TrainedModel": ".saved",
    **dict.fromkeys(["SGD", "Adagrad", "Adam", "Momentum", "make_optimizer"], ".optim"),
    **dict.fromkeys(["Trainer", "TrainResult"], ".trainer"),
}

__all__ = sorted([*_EXPORTS, "__version__"])
_lazy_getattr, __dir__ = lazy(__name__, _EXPORTS)


def __getattr__(name: str):
    if name == "__version__":
        # importlib.metadata is slow to import and loads socket: only on demand.
        from importlib.metadata import PackageNotFoundError, version

        try:
            value = version("dbnode")
        except PackageNotFoundError:  # pragma: no cover - only when run uninstalled
            value = "0+unknown"
        globals()["__version__"] = value
        return value
    return _lazy_getattr(name)

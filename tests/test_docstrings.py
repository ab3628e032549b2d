"""Public names are documented: Google-style docstrings, kept so.

Every public function and class of the modules below (their ``__all__``,
or, without one, the public names they define) has a docstring; a function
or public method that takes parameters has an ``Args:`` section. Names
defined in the driver, the parameter server, partitions, nodes and control
are left to their own tests.
"""

import importlib
import inspect

import pytest

MODULES = [
    "dbnode",
    "dbnode.wire",
    "dbnode.wire.frames",
    "dbnode.wire.decoder",
    "dbnode.wire.secret",
    "dbnode.wire.session",
    "dbnode.wire.reply",
    "dbnode.wire.sockio",
    "dbnode.wire.connection",
    "dbnode.wire.handshake",
    "dbnode.wire.channel",
    "dbnode.wire.endpoints",
    "dbnode.wire.peers",
    "dbnode.wire.shm",
    "dbnode.optim",
    "dbnode.config",
    "dbnode.model",
    "dbnode.metrics",
    "dbnode.saved",
    "dbnode.dump",
    "dbnode.layers",
    "dbnode.blocks",
    "dbnode.data",
    "dbnode.placement",
    "dbnode.traffic",
    "dbnode.codecs",
    "dbnode.threads",
    "dbnode.partition_core",
    "dbnode.pipeline",
    "dbnode.kernels",
    "dbnode.durable",
    "dbnode.trainer",
]

EXCLUDED = ("dbnode.driver", "dbnode.ps", "dbnode.partition", "dbnode.node", "dbnode.control")


def _excluded(module: str) -> bool:
    return any(module == e or module.startswith(e + ".") for e in EXCLUDED)


def public_names(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    names = getattr(module, "__all__", None)
    if names is None:
        names = [
            name
            for name, value in vars(module).items()
            if not name.startswith("_") and getattr(value, "__module__", None) == module_name
        ]
    return list(names)


def takes_parameters(func) -> bool:
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False
    return any(name not in ("self", "cls") for name in params)


def documented(obj) -> str:
    return (getattr(obj, "__doc__", None) or "").strip()


def class_problems(qualname: str, cls: type) -> list[str]:
    problems = []
    doc = documented(cls)
    # A dataclass without a docstring gets its signature as one.
    if not doc or doc.startswith(f"{cls.__name__}("):
        problems.append(f"{qualname}: no docstring")
    for name, attr in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(attr, property):
            if not documented(attr.fget):
                problems.append(f"{qualname}.{name}: property without a docstring")
            continue
        func = attr.__func__ if isinstance(attr, (classmethod, staticmethod)) else attr
        if not inspect.isroutine(func):
            continue
        if not documented(func):
            problems.append(f"{qualname}.{name}: no docstring")
        elif takes_parameters(func) and "Args:" not in documented(func):
            problems.append(f"{qualname}.{name}: takes parameters, no Args: section")
    return problems


@pytest.mark.parametrize("module_name", MODULES)
def test_public_names_have_google_docstrings(module_name):
    module = importlib.import_module(module_name)
    problems = []
    for name in public_names(module_name):
        obj = getattr(module, name)  # the packages load their names lazily
        defined_in = getattr(obj, "__module__", None) or ""
        if _excluded(defined_in):
            continue
        qualname = f"{defined_in}.{name}"
        if inspect.isclass(obj):
            problems += class_problems(qualname, obj)
        elif inspect.isroutine(obj):
            if not documented(obj):
                problems.append(f"{qualname}: no docstring")
            elif takes_parameters(obj) and "Args:" not in documented(obj):
                problems.append(f"{qualname}: takes parameters, no Args: section")
    assert not problems, "\n".join(problems)

"""The installed package: public surface, command line, compiled build checks."""

import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

import dbnode
from dbnode import _buildinfo, kernels

# The console script installed beside this interpreter (the venv may not be on PATH).
_BESIDE = Path(sys.executable).with_name("dbnode")
DBNODE = str(_BESIDE) if _BESIDE.exists() else shutil.which("dbnode")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )


def test_public_api_is_pinned():
    assert sorted(dbnode.__all__) == [
        "Adagrad",
        "Adam",
        "Classifier",
        "ConfigError",
        "DBNodeError",
        "LayerStack",
        "LocalProtocolError",
        "ModelSpec",
        "Momentum",
        "ProtocolError",
        "Regressor",
        "RemoteProtocolError",
        "RunConfig",
        "SGD",
        "StopTraining",
        "Summary",
        "TrainResult",
        "TrainedModel",
        "Trainer",
        "__version__",
        "evaluate",
        "from_bias_first",
        "init_params",
        "load",
        "load_params",
        "make_optimizer",
        "plot",
        "predict",
        "save_params",
        "to_bias_first",
        "train",
    ]
    for name in dbnode.__all__:
        assert getattr(dbnode, name) is not None


def test_dbnode_command_reports_its_version():
    out = subprocess.run([DBNODE, "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"dbnode {dbnode.__version__}"
    assert dbnode.__version__[0].isdigit()


def test_kernels_are_compiled_not_a_fallback():
    assert kernels._k.__file__.endswith((".so", ".pyd"))
    assert kernels._k.KERNELS_API == kernels.KERNELS_API
    assert kernels.max_threads() >= 1


def test_missing_compiled_module_is_a_loud_error():
    out = run_python("""
        import sys
        sys.modules["dbnode._kernels"] = None   # as if the build had not produced it
        import dbnode.kernels
    """)
    assert out.returncode != 0
    assert "compiled kernels are missing" in out.stderr and "pip install ." in out.stderr


def test_kernels_built_for_another_cpu_refuse_to_load():
    out = run_python("""
        import sys, types
        sys.modules["dbnode._target"] = types.SimpleNamespace(
            MARCH="native", CPU_FLAGS=("sse2", "no_such_cpu_feature"))
        import dbnode.kernels
    """)
    assert out.returncode != 0
    assert "no_such_cpu_feature, which this CPU lacks" in out.stderr
    assert "DBNODE_MARCH=portable" in out.stderr


def test_missing_cpu_flags_reads_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2\n")
    assert _buildinfo.missing_cpu_flags(("avx2", "avx512f", "sse2"), cpuinfo) == ["avx512f"]
    assert _buildinfo.missing_cpu_flags(("avx",), cpuinfo) == []
    assert _buildinfo.missing_cpu_flags(("avx",), tmp_path / "absent") == []


def test_cpu_flags_of_compiler_macros():
    macros = "#define __AVX2__ 1\n#define __FMA__ 1\n#define __x86_64__ 1\n"
    assert _buildinfo.cpu_flags_of(macros) == ["avx2", "fma"]


def test_source_hash_follows_every_kernel_source(tmp_path):
    (tmp_path / "_k.pyx").write_text("a")
    (tmp_path / "m.h").write_text("b")
    (tmp_path / "notes.txt").write_text("c")
    first = _buildinfo.source_hash(tmp_path)
    (tmp_path / "notes.txt").write_text("changed")
    assert _buildinfo.source_hash(tmp_path) == first
    (tmp_path / "m.h").write_text("changed")
    assert _buildinfo.source_hash(tmp_path) != first


@pytest.mark.parametrize("argv", [[], ["no-such-command"]])
def test_cli_without_a_valid_command_fails(argv):
    out = subprocess.run([DBNODE, *argv], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (ROOT / "setup.py").is_file(), reason="needs the source tree")
def test_sdist_ships_the_kernel_sources_and_builds_a_wheel(tmp_path):
    # python -m build makes the sdist, then builds the wheel from the sdist
    # alone: this fails if a .pyx, .h or build file is missing from it.
    out = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(tmp_path), str(ROOT)],
        env={**os.environ, "DBNODE_MARCH": "portable"},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    (sdist,) = tmp_path.glob("dbnode-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    assert {
        "csrc/_kernels.pyx",
        "csrc/_target.pyx",
        "csrc/dbnode_math.h",
        "setup.py",
        "pyproject.toml",
        "README.md",
        "engine/kernels.py",
        "cli/main.py",
    } <= names
    (wheel,) = tmp_path.glob("dbnode-*.whl")
    with zipfile.ZipFile(wheel) as whl:
        files = whl.namelist()
    for module in ("dbnode/_kernels", "dbnode/_target"):
        assert any(f.startswith(module) and f.endswith(".so") for f in files), files
    assert "dbnode/cli/main.py" in files and "dbnode/kernels.py" in files
    for package in ("wire", "ps", "driver"):
        assert f"dbnode/{package}/__init__.py" in files, files
    assert not any(f.endswith(".pyx") for f in files)


def test_verbose_goes_before_or_after_the_command_and_serve_help_shows_its_default():
    from dbnode.cli.main import build_parser

    parser = build_parser()
    assert parser.parse_args(["-v", "status", "--hosts", "h:1"]).verbose
    assert parser.parse_args(["status", "--hosts", "h:1", "-v"]).verbose
    assert not parser.parse_args(["status", "--hosts", "h:1"]).verbose
    serve = parser._subparsers._group_actions[0].choices["serve"]
    assert "default 127.0.0.1:7070;" in " ".join(serve.format_help().split())

"""Build of dbnode's compiled kernels (csrc/ -> dbnode._kernels).

Everything else about the package lives in pyproject.toml.  This file only
describes the extension: one set of Cython directives for every module,
``-O3``, OpenMP when the compiler has it (and a clean serial build when it
does not), and a debug switch::

    DBNODE_DEBUG=1 pip install .          # bounds checks on, -O0 -g
    DBNODE_OPENMP=0 pip install .         # force a serial build
    DBNODE_MARCH=portable pip install .   # no -march: a wheel for other CPUs

By default the kernels are compiled for the building machine's CPU
(``-march=native``): the vector loops then use AVX2/AVX-512 where the CPU
has them, 2-5x faster than the baseline SSE2 build. The CPU features the
build relies on are recorded beside the module, and importing it on a CPU
without them is a clear ImportError rather than a crash.
"""

import os
import runpy
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
DEBUG = os.environ.get("DBNODE_DEBUG", "0") not in ("", "0")
MARCH = os.environ.get("DBNODE_MARCH", "native")

DIRECTIVES = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": not DEBUG,
    "embedsignature": True,
}


buildinfo = runpy.run_path(str(HERE / "engine" / "_buildinfo.py"))


def compiles(compiler, flags: list[str], source: str) -> bool:
    """Whether the real compiler builds and links ``source`` with ``flags``."""
    tmp = tempfile.mkdtemp()
    try:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(source)
        objs = compiler.compile([src], output_dir=tmp, extra_postargs=flags)
        compiler.link_executable(objs, os.path.join(tmp, "probe"), extra_postargs=flags)
        return True
    except Exception:
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def required_cpu_flags(compiler, flags: list[str]) -> list[str]:
    """CPU features that code compiled with ``flags`` may use."""
    try:
        macros = subprocess.run(
            [compiler.compiler_so[0], *flags, "-dM", "-E", "-x", "c", os.devnull],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return buildinfo["cpu_flags_of"](macros)


class BuildExt(build_ext):
    def build_extensions(self):
        openmp = (
            sys.platform != "win32"
            and os.environ.get("DBNODE_OPENMP", "1") not in ("", "0")
            and compiles(
                self.compiler,
                ["-fopenmp"],
                "#include <omp.h>\nint main(void){return omp_get_max_threads() < 1;}\n",
            )
        )
        if not openmp:
            print("dbnode: building kernels without OpenMP (serial)", file=sys.stderr)
        march = [] if MARCH in ("", "portable") else [f"-march={MARCH}"]
        if march and not compiles(self.compiler, march, "int main(void){return 0;}\n"):
            print(
                f"dbnode: compiler refuses {march[0]}; building for its default target",
                file=sys.stderr,
            )
            march = []
        kernels, target = self.extensions
        kernels.define_macros.append(("DBNODE_OPENMP", "1" if openmp else "0"))
        kernels.extra_compile_args += march + (["-fopenmp"] if openmp else [])
        if openmp:
            kernels.extra_link_args.append("-fopenmp")
        # dbnode._target itself is built for the default target: it must load
        # anywhere, to say what the kernels need.
        flags = " ".join(required_cpu_flags(self.compiler, march))
        target.define_macros += [
            ("DBNODE_MARCH", f'"{MARCH if march else "portable"}"'),
            ("DBNODE_CPU_FLAGS", f'"{flags}"'),
        ]
        super().build_extensions()


# -fno-math-errno and -fno-trapping-math let GCC vectorize sqrt and the
# branch-free selects in csrc/dbnode_math.h; neither changes a result.
# (-ffast-math would, and is not used.)
opt = ["-O0", "-g"] if DEBUG else ["-O3", "-fno-math-errno", "-fno-trapping-math"]
extensions = [
    Extension(
        "dbnode._kernels",
        ["csrc/_kernels.pyx"],
        include_dirs=[numpy.get_include(), "csrc"],
        define_macros=[
            ("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION"),
            # Compiled in, so that a source checkout can tell a stale build.
            ("DBNODE_SOURCE_HASH", f'"{buildinfo["source_hash"](HERE / "csrc")}"'),
        ],
        extra_compile_args=opt,
    ),
    Extension("dbnode._target", ["csrc/_target.pyx"]),
]

setup(
    ext_modules=cythonize(extensions, compiler_directives=DIRECTIVES, language_level=3),
    cmdclass={"build_ext": BuildExt},
)

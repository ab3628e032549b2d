"""Build of dbnode's compiled kernels (csrc/ -> dbnode._kernels).

Everything else about the package lives in pyproject.toml.  This file only
describes the extension: one set of Cython directives for every module,
``-O3``, OpenMP when the compiler has it (and a clean serial build when it
does not), and a debug switch::

    DBNODE_DEBUG=1 pip install .      # bounds checks on, -O0 -g
    DBNODE_OPENMP=0 pip install .     # force a serial build
"""

import os
import runpy
import shutil
import sys
import tempfile
from pathlib import Path

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
DEBUG = os.environ.get("DBNODE_DEBUG", "0") not in ("", "0")

DIRECTIVES = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": not DEBUG,
    "embedsignature": True,
}


# Compiled into the module so that a source checkout can tell a stale build.
source_hash = runpy.run_path(str(HERE / "engine" / "_buildinfo.py"))["source_hash"]


def compiler_has_openmp(compiler) -> bool:
    """Try to compile and link a tiny OpenMP program with the real compiler."""
    if os.environ.get("DBNODE_OPENMP", "1") in ("", "0"):
        return False
    tmp = tempfile.mkdtemp()
    try:
        src = os.path.join(tmp, "omp.c")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main(void){return omp_get_max_threads() < 1;}\n")
        objs = compiler.compile([src], output_dir=tmp, extra_postargs=["-fopenmp"])
        compiler.link_executable(objs, os.path.join(tmp, "omp"), extra_postargs=["-fopenmp"])
        return True
    except Exception:
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class BuildExt(build_ext):
    def build_extensions(self):
        openmp = sys.platform != "win32" and compiler_has_openmp(self.compiler)
        if not openmp:
            print("dbnode: building kernels without OpenMP (serial)", file=sys.stderr)
        for ext in self.extensions:
            ext.define_macros.append(("DBNODE_OPENMP", "1" if openmp else "0"))
            if openmp:
                ext.extra_compile_args.append("-fopenmp")
                ext.extra_link_args.append("-fopenmp")
        super().build_extensions()


opt = ["-O0", "-g"] if DEBUG else ["-O3", "-fno-math-errno"]
extensions = [
    Extension(
        "dbnode._kernels",
        ["csrc/_kernels.pyx"],
        include_dirs=[numpy.get_include(), "csrc"],
        define_macros=[
            ("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION"),
            ("DBNODE_SOURCE_HASH", '"%s"' % source_hash(HERE / "csrc")),
        ],
        extra_compile_args=opt,
    )
]

setup(
    ext_modules=cythonize(extensions, compiler_directives=DIRECTIVES, language_level=3),
    cmdclass={"build_ext": BuildExt},
)

"""Build the turboquant extension, with OpenMP when the compiler supports it.

Environment switches:

``TURBOQUANT_NO_OPENMP=1``
    build without OpenMP even when it is available (kernels then run serially).
``TURBOQUANT_DEBUG=1``
    compile the Cython kernels with bounds and initialisation checks. When
    switching between debug and normal builds in one tree, add ``--force``
    (``build_ext --inplace --force``) so that nothing is reused.

Cython and numpy are needed only to build the extension: ``sdist`` and
``egg_info`` (the file lists) run with setuptools alone.
"""

import os
import sys
import tempfile
import textwrap

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPENMP_PROBE = textwrap.dedent(
    """
    #include <omp.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        return n > 0 ? 0 : 1;
    }
    """
)


def _openmp_flags(compiler):
    """Return (compile_args, link_args) for OpenMP, or None when it does not work."""
    if os.environ.get("TURBOQUANT_NO_OPENMP", "") not in ("", "0"):
        return None
    if compiler.compiler_type == "msvc":
        candidates = [(["/openmp"], [])]
    elif sys.platform == "darwin":
        candidates = [(["-Xpreprocessor", "-fopenmp"], ["-lomp"]), (["-fopenmp"], ["-fopenmp"])]
    else:
        candidates = [(["-fopenmp"], ["-fopenmp"])]
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe_openmp.c")
        with open(source, "w") as handle:
            handle.write(OPENMP_PROBE)
        for compile_args, link_args in candidates:
            try:
                objects = compiler.compile([source], output_dir=tmp, extra_postargs=compile_args)
                compiler.link_executable(
                    objects, "probe_openmp", output_dir=tmp, extra_postargs=link_args
                )
            except Exception:  # any compiler or linker failure means "no OpenMP"
                continue
            return compile_args, link_args
    return None


class BuildExtWithOpenMP(build_ext):
    """build_ext that cythonizes the kernels, probes the real compiler for OpenMP
    once, then uses it on compile and link."""

    def build_extensions(self):
        import numpy as np
        from Cython.Build import cythonize

        # Generate the C sources here, not earlier: sdist and egg_info finalize
        # this command too, to list the extension's sources.
        for ext, generated in zip(self.extensions, cythonize(
                self.extensions, compiler_directives=DIRECTIVES, force=bool(self.force))):
            ext.sources = generated.sources
            ext.include_dirs.append(np.get_include())
        flags = _openmp_flags(self.compiler)
        if flags is None:
            reason = (
                "disabled by TURBOQUANT_NO_OPENMP"
                if os.environ.get("TURBOQUANT_NO_OPENMP", "") not in ("", "0")
                else "not available with this compiler"
            )
            print(f"turboquant: OpenMP is {reason}; building serial kernels.", file=sys.stderr)
            compile_args, link_args = [], []
        else:
            compile_args, link_args = flags
        for ext in self.extensions:
            ext.extra_compile_args = list(ext.extra_compile_args) + compile_args
            ext.extra_link_args = list(ext.extra_link_args) + link_args
        super().build_extensions()


DEBUG = os.environ.get("TURBOQUANT_DEBUG", "") not in ("", "0")
DIRECTIVES = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": DEBUG,
    "embedsignature": True,
    "autotestdict": False,
}
OPT = ["-O0", "-g"] if DEBUG else ["-O3"]
# Kernel variants for different instruction sets must round alike (include/tq_tile.h):
# never contract a multiply and an add into an FMA.
FP_FLAGS = ["-ffp-contract=off"]

extensions = [
    Extension(
        "turboquant._kernels._core",
        sources=["turboquant/_kernels/_core.pyx"],
        include_dirs=["include"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=[] if sys.platform == "win32" else OPT + FP_FLAGS,
    )
]

setup(
    ext_modules=extensions,
    cmdclass={"build_ext": BuildExtWithOpenMP},
)

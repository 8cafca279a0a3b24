"""The public surface: exports, docstrings, configuration, threads, stubs and the CLI."""

import importlib.metadata
import io
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

import turboquant
from conftest import run_python
from turboquant import InvalidParameterError, resolve_n_threads, show_config
from turboquant._kernels import _core



# -- exports ------------------------------------------------------------------------
@pytest.mark.parametrize("name", turboquant.__all__)
def test_public_names_importable_and_documented(name):
    obj = getattr(turboquant, name)
    if name == "__version__":
        assert re.fullmatch(r"\d+\.\d+\.\d+([.\w+-]*)", obj)
        return
    doc = obj.__doc__                                  # class docstrings are not inherited
    assert doc and doc.strip(), f"{name} has no docstring"
    if callable(obj) and not isinstance(obj, type):
        assert "Returns" in doc or "Raises" in doc or "Parameters" in doc, f"{name}: not numpydoc"


def test_all_lists_every_public_name():
    public = {name for name in dir(turboquant) if not name.startswith("_")
              and not isinstance(getattr(turboquant, name), type(turboquant))}
    assert public <= set(turboquant.__all__), public - set(turboquant.__all__)
    assert len(set(turboquant.__all__)) == len(turboquant.__all__)


def test_star_import():
    namespace = {}
    exec("from turboquant import *", namespace)
    assert set(turboquant.__all__) <= set(namespace)


def test_public_methods_documented():
    for cls in (turboquant.TurboQuantMSE, turboquant.TurboQuantProd, turboquant.QJL):
        for method in ("quantize", "dequantize", "inner_products"):
            assert getattr(cls, method).__doc__, f"{cls.__name__}.{method}"
    for cls in (turboquant.MSECodes, turboquant.ProdCodes, turboquant.QJLCodes):
        for method in ("from_arrays", "to_arrays", "drop_oldest", "concatenate"):
            assert getattr(cls, method).__doc__, f"{cls.__name__}.{method}"


# -- show_config ------------------------------------------------------------------------
def test_show_config_returns_and_prints(capsys):
    info = show_config()
    printed = capsys.readouterr().out
    assert info["version"] == turboquant.__version__
    assert isinstance(info["openmp"], bool)
    assert isinstance(info["max_threads"], int) and info["max_threads"] >= 1
    assert info["openmp"] == _core.openmp_enabled()
    for key, value in info.items():
        assert re.search(rf"^\s*{key}: {re.escape(str(value))}$", printed, re.MULTILINE), key


def test_show_config_to_a_file(capsys):
    stream = io.StringIO()
    info = show_config(file=stream)
    assert capsys.readouterr().out == ""
    assert f"version: {info['version']}" in stream.getvalue()


def test_import_leaves_the_environment_alone():
    code = ("import json, os; os.environ.pop('OMP_WAIT_POLICY', None); before = dict(os.environ); "
            "import turboquant, io; info = turboquant.show_config(file=io.StringIO()); "
            "print(json.dumps([dict(os.environ) == before, info['wait_policy']]))")
    result = run_python("-c", code)
    assert result.returncode == 0, result.stderr
    unchanged, policy = json.loads(result.stdout)
    assert unchanged
    assert policy.startswith("unset") and "OMP_WAIT_POLICY=PASSIVE" in policy


def test_show_config_reports_the_wait_policy_read_at_import():
    code = ("import io, os, turboquant; os.environ['OMP_WAIT_POLICY'] = 'ACTIVE'; "
            "print(turboquant.show_config(file=io.StringIO())['wait_policy'])")
    result = run_python("-c", code, OMP_WAIT_POLICY="passive")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "passive"


def test_show_config_follows_omp_num_threads():
    if not _core.openmp_enabled():
        pytest.skip("built without OpenMP")
    result = run_python("-c", "import io, turboquant as t; info = t.show_config(file=io.StringIO()); "
                        "print(info['max_threads'], t.resolve_n_threads())", OMP_NUM_THREADS="3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["3", "3"]


# -- resolve_n_threads --------------------------------------------------------------------
def test_resolve_n_threads_values():
    assert resolve_n_threads() == resolve_n_threads(None) == max(1, _core.max_threads())
    assert resolve_n_threads(-1) == max(1, _core.num_procs())
    assert resolve_n_threads(1) == 1
    assert resolve_n_threads(3) == 3
    assert resolve_n_threads(-(_core.num_procs() + 5)) == 1
    assert resolve_n_threads(-2) == max(1, _core.num_procs() - 1)
    assert resolve_n_threads(np.int64(2)) == 2


@pytest.mark.parametrize("value, message", [(0, "must not be 0"), ("2", "integer or None"),
                                            (2.0, "integer or None"), (True, "integer or None"),
                                            ([1], "integer or None")])
def test_resolve_n_threads_errors(value, message):
    with pytest.raises(InvalidParameterError, match=message):
        resolve_n_threads(value)


# -- stubs ---------------------------------------------------------------------------------
def test_core_stub_matches_runtime(tmp_path):
    pytest.importorskip("mypy")
    # Check only _core against _core.pyi: the rest of the package is untyped code
    # that mypy would otherwise report first.
    config = tmp_path / "mypy.ini"
    config.write_text(f"[mypy]\nignore_missing_imports = True\ncache_dir = {tmp_path / 'cache'}\n"
                      "[mypy-turboquant.*]\nignore_errors = True\n"
                      "[mypy-turboquant._kernels._core]\nignore_errors = False\n")
    result = run_python("-m", "mypy.stubtest", "turboquant._kernels._core", "--mypy-config-file", str(config))
    assert result.returncode == 0, result.stdout + result.stderr


def installed_distribution():
    """The installed distribution the turboquant under test comes from, or None
    when it is imported from a source tree."""
    try:
        dist = importlib.metadata.distribution("cyturboquant")
    except importlib.metadata.PackageNotFoundError:
        return None
    installed = pathlib.Path(dist.locate_file("turboquant/__init__.py")).resolve()
    return dist if installed == pathlib.Path(turboquant.__file__).resolve() else None


def test_stub_and_marker_are_shipped():
    """Every module ``import turboquant`` loads, the extension, the stub and the
    py.typed marker are files of the installed distribution."""
    dist = installed_distribution()
    if dist is None:
        # .ci/run sets TURBOQUANT_TEST_INSTALLED where it tests an installed package.
        assert not os.environ.get("TURBOQUANT_TEST_INSTALLED"), "turboquant is not the installed one"
        pytest.skip("turboquant is imported from a source tree, not from an installed distribution")
    files = {pathlib.Path(dist.locate_file(f)).resolve() for f in dist.files}
    package = pathlib.Path(turboquant.__file__).resolve().parent
    loaded = {pathlib.Path(module.__file__).resolve() for name, module in list(sys.modules.items())
              if name.split(".")[0] == "turboquant" and getattr(module, "__file__", None)}
    assert {"turboquant.quant", "turboquant.kv", "turboquant._kernels._core"} <= set(sys.modules)
    for path in sorted(loaded) + [package / "_kernels" / "_core.pyi", package / "py.typed"]:
        assert path in files and path.is_file(), path


def test_sdist_ships_every_header_and_kernel_source(tmp_path):
    """The sdist's file list, made by setuptools from pyproject.toml and
    MANIFEST.in, holds every header under include/, every Cython source and
    stub, the marker and the tests; and no generated C or compiled module."""
    root = pathlib.Path(__file__).resolve().parent.parent
    if not (root / "MANIFEST.in").is_file():
        pytest.skip("the tests do not sit in a source tree")
    result = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)],
                            cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    listed = set((tmp_path / "cyturboquant.egg-info" / "SOURCES.txt").read_text().split())
    expected = {str(path.relative_to(root).as_posix()) for pattern in
                ("include/*.h", "turboquant/**/*.pyx", "turboquant/**/*.pxd", "turboquant/**/*.pxi",
                 "turboquant/**/*.pyi", "turboquant/**/py.typed", "turboquant/**/*.py", "tests/*.py")
                for path in root.glob(pattern)}
    assert {"include/tq_openmp.h", "turboquant/_kernels/_common.pxd", "tests/conftest.py"} <= expected
    assert expected - listed == set()
    assert not [name for name in listed if name.endswith((".c", ".so", ".pyd", ".html"))]


# -- command line ----------------------------------------------------------------------------
def test_cli_prints_a_table():
    result = run_python("-m", "turboquant", "--n", "2000")
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()
            if re.match(r"^\s*[1-8]\s+\d", line)]
    assert [int(row[0]) for row in rows] == list(range(1, 9))
    for row in rows:
        measured, expected = float(row[1]), float(row[2])
        # The per-vector error's relative spread at d = 128 is at most 0.86 (b = 8), so
        # with 2000 vectors four standard errors are at most 7.7% of the mean.
        assert abs(measured - expected) <= 0.1 * expected, row
    assert "version" in result.stdout


def test_cli_rejects_bad_arguments():
    result = run_python("-m", "turboquant", "--rotation", "foo")
    assert result.returncode == 2
    assert "rotation" in result.stderr

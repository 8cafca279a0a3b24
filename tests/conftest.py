"""Shared fixtures; makes ``python -m pytest`` test the installed package.

``python -m pytest`` puts the working directory first on ``sys.path``, where
the ``turboquant/`` source folder has no compiled extension unless it was built
in place. In that case drop the source folder from the path so the installed
package is imported.
"""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
if not any((ROOT / "turboquant" / "_kernels").glob("_core*.so")) and not any((ROOT / "turboquant" / "_kernels").glob("_core*.pyd")):
    sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != ROOT]

import numpy as np  # noqa: E402
import pytest  # noqa: E402

SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def random_unit_vectors(n, dim, seed):
    """``n`` independent uniformly random unit vectors in R^dim (float64)."""
    x = np.random.default_rng(seed).standard_normal((n, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def shared_data(name):
    """Path of a file in ``../shared/data``; skips the test when it is absent."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is not available")
    return path


def run_python(*args, timeout=120, **env_vars):
    """Run ``python *args`` in an empty folder so it imports the turboquant under test.

    An installed package is found as usual; an in-place build (no site-packages
    parent) is put on ``PYTHONPATH``. ``env_vars`` are added to the environment.
    """
    import os
    import subprocess
    import tempfile

    import turboquant

    package_root = pathlib.Path(turboquant.__file__).resolve().parent.parent
    env = dict(os.environ, **env_vars)
    if package_root.name not in ("site-packages", "dist-packages"):
        env["PYTHONPATH"] = str(package_root) + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory() as folder:
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                              cwd=folder, timeout=timeout)


@pytest.fixture
def teams(monkeypatch):
    """``teams(name)`` makes every call of ``_core.<name>`` (from the package too)
    append the team size it ran with to ``teams.sizes``."""
    from turboquant._kernels import _core

    def spy(name):
        kernel = getattr(_core, name)

        def call(*args, **kwargs):
            kernel(*args, **kwargs)
            spy.sizes.append(_core._last_team_size())
        monkeypatch.setattr(_core, name, call)

    spy.sizes = []
    return spy

"""pytest plumbing of the benchmarks: the shared results and the end-of-run report.

Run with ``python -m pytest bench --benchmark-only`` (``bench/`` is not in the
default ``testpaths``). Every ``test_bench`` case records its median in one
:class:`reference.Results`; after pytest-benchmark's own tables, the summary
prints one ``reference_time / turboquant_time`` line per benchmark group and the
markdown table of ``bench/README.md``.
"""

import os
import pathlib
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when OpenMP loads (README, threads)

import pytest

BENCH = pathlib.Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
# Like tests/conftest.py: without an in-place build, test the installed package.
if not any((ROOT / "turboquant" / "_kernels").glob("_core*.so")) and not any((ROOT / "turboquant" / "_kernels").glob("_core*.pyd")):
    sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != ROOT]

from reference import (  # noqa: E402
    Results,
    environment_lines,
    format_table,
    load_average,
    source_digest,
)

RESULTS = Results()
START = {}


def pytest_sessionstart(session):
    START.update(load=load_average(), sources=source_digest())


@pytest.fixture(scope="session")
def bench_results():
    """The run's :class:`reference.Results`, reported by :func:`pytest_terminal_summary`."""
    return RESULTS


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not RESULTS.rows():
        return
    write = terminalreporter.write_line
    terminalreporter.section("turboquant vs numpy reference")
    for line in RESULTS.ratio_lines():
        write(line)
    write("")
    command = " ".join(["python -m pytest", *config.invocation_params.args])
    if os.environ.get("TURBOQUANT_BENCH_N"):
        command = f"TURBOQUANT_BENCH_N={os.environ['TURBOQUANT_BENCH_N']} {command}"
    environment = environment_lines(START.get("load"), START.get("sources")) + RESULTS.notes
    write(format_table(RESULTS, command=command, environment=environment))

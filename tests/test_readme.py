"""The README's Python examples run as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def python_blocks():
    if not README.exists():
        return []
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_block_runs(index, capsys):
    block = python_blocks()[index]
    if "turboquant.hf" in block:  # the transformers example needs the hf extra
        pytest.importorskip("torch")
        pytest.importorskip("transformers")
    exec(compile(block, f"README.md block {index}", "exec"), {})


def test_readme_has_the_two_commands():
    text = README.read_text()
    assert 'pip install -e . && python -m turboquant' in text
    assert 'pip install ".[test]" && python -m pytest' in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert 'pip install ".[test]" && python -m pytest' in ci

"""The README's examples: its Python blocks run as written, and its Cython block is
quoted from the C-API example that tests/test_capi.py builds and checks."""
import importlib.util
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TEXT = README.read_text() if README.exists() else ""
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, re.S)
CYTHON = re.findall(r"```cython\n(.*?)```", TEXT, re.S)
needs_readme = pytest.mark.skipif(not README.exists(),
                                  reason="README.md is not beside the tests (installed copy)")


@needs_readme
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    block = BLOCKS[index]
    if re.search(r"^import torch", block, re.M) and importlib.util.find_spec("torch") is None:
        pytest.skip("this example needs PyTorch")
    exec(compile(block, f"README.md block {index}", "exec"), {})


@needs_readme
def test_readme_cython_is_the_tested_example():
    example = (ROOT / "examples/capi/lstm_capi.pyx").read_text()
    assert CYTHON, "README.md has no cython example"
    for block in CYTHON:
        for line in block.splitlines():
            assert line in example, f"README cython line not in examples/capi: {line!r}"


def test_readme_has_examples():
    assert BLOCKS or not README.exists(), "README.md has no python examples"


@needs_readme
def test_readme_links_point_to_files():
    links = re.findall(r"\]\(([^)#:]+)\)", TEXT)
    assert "docs/design.md" in links and "docs/performance.md" in links
    for link in links:
        assert (ROOT / link).exists(), f"README.md links to {link}, which is not there"


@needs_readme
def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text() if (ROOT / ".ci" / "run").exists() else ""
    command = "pip install -e '.[test]' && pytest"
    assert command in TEXT and (not ci or command in ci)


@needs_readme
def test_readme_is_a_five_minute_read():
    assert len(TEXT.splitlines()) < 200, "README.md is for users: details go to docs/"

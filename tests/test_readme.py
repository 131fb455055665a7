"""README.md's Python examples run as written, and its commands exist."""

from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_opens_with_the_two_commands():
    text = README.read_text()
    bash = re.findall(r"```bash\n(.*?)```", text, re.S)
    assert "cnnjax train" in bash[0]
    assert "pytest" in bash[1]
    ci = (README.parent / ".ci" / "run").read_text()
    # CI runs exactly the README's test command.
    assert bash[1].strip() in ci


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_python_block_runs(index, capsys):
    namespace: dict = {}
    exec(compile(_python_blocks()[index], f"README block {index}", "exec"), namespace)
    # The shapes the README's comments promise.
    expected = {"y": (8, 15, 15, 16), "g": (3, 3, 3, 16), "logits": (4, 10)}
    checked = [name for name in expected if name in namespace]
    assert checked, "each README block defines at least one of the checked names"
    for name in checked:
        assert namespace[name].shape == expected[name], name
    if "net" in namespace:
        assert namespace["maps"]["conv1"].shape == (1, 28, 28, 6)

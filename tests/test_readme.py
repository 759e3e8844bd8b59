"""The README's Python example runs as written (on the real packaged model)."""

from __future__ import annotations

import re
from pathlib import Path

import torch


def test_readme_python_example_runs():
    text = Path(__file__).parent.parent.joinpath("README.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(code.strip().splitlines()) <= 25
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    start, new, updates = scope["start"], scope["new_global"], scope["updates"]
    key = next(k for k in start if k.endswith(".R"))
    expected = start[key] + (updates[0][key] + updates[1][key]) / 2
    assert torch.allclose(new[key], expected, atol=1e-7)
    assert start[key].shape == (8, 8)

"""Packaging: the wheel holds the four packages (fedsb, edge_client, aggregator, export)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_wheel_contains_all_packages(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("fedsb-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in (
        "fedsb",
        "fedsb/edge_client",
        "fedsb/aggregator",
        "fedsb/export",
        "fedsb/methods",
        "fedsb/data",
    ):
        assert f"{package}/__init__.py" in names, package
    sources = {p.relative_to(ROOT).with_suffix("").as_posix() for p in ROOT.glob("sdk/**/*.py")}
    assert len([n for n in names if n.startswith("fedsb/") and n.endswith(".py")]) >= len(sources)


def test_cli_entry_point_is_installed():
    out = subprocess.run(
        [Path(sys.executable).parent / "fedsb", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    assert "simulate" in out.stdout

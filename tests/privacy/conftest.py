"""Private jobs on the tiny model: the shared tiny job plus a [privacy] section."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fedsb.config import JobConfig, parse_config


@pytest.fixture
def private_job(tiny_model_dir: Path) -> Callable[..., JobConfig]:
    """make(privacy={...}, **federation) -> JobConfig of the tiny job with that privacy block."""
    from conftest import tiny_job

    def make(privacy: dict[str, Any], **federation: Any) -> JobConfig:
        return parse_config(tiny_job(tiny_model_dir, **federation) | {"privacy": privacy})

    return make

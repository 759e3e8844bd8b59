"""Where the command line writes: one rich console on stderr (one error, one line) and a logger."""

from __future__ import annotations

import logging

from rich.console import Console

log = logging.getLogger("fedsb")
console = Console(stderr=True, soft_wrap=True)

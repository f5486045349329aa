"""pytest plugin (entry point ``pytest11``): the ``plugin_conformance`` fixture. Imports nothing heavy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest


@pytest.fixture
def plugin_conformance() -> Callable[..., Any]:
    """Build a :class:`inference_pio.testing.Conformance` for a plugin factory."""
    from inference_pio.testing.conformance import Conformance

    return Conformance

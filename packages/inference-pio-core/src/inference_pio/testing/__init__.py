"""Conformance kit for plugin authors: check a plugin the way inference-pio will use it.

Light on import (no torch). In a test suite, use the ``plugin_conformance`` pytest fixture (this
package is a pytest plugin) or call :func:`run_conformance` directly::

    def test_my_plugin_conforms(plugin_conformance):
        plugin_conformance(create_my_plugin, config={"device": "cpu"}, distribution="my-dist").run_all()
"""

from __future__ import annotations

from inference_pio.testing.conformance import Conformance, ConformanceError, run_conformance

__all__ = ["Conformance", "ConformanceError", "run_conformance"]

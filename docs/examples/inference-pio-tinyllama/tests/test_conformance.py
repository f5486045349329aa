"""The plugin passes inference-pio's conformance kit (run with: pip install -e '.[test]' && pytest tests)."""

from pathlib import Path

from inference_pio_tinyllama.plugin import create_plugin
from inference_pio_tinyllama.testing import make_tiny_checkpoint


def test_tinyllama_conforms(plugin_conformance, tmp_path: Path) -> None:
    checkpoint = make_tiny_checkpoint(tmp_path / "tiny-tinyllama")
    kit = plugin_conformance(
        create_plugin,
        config={"device": "cpu", "model_path": str(checkpoint), "max_context": 256},
        distribution="inference-pio-tinyllama",
    )
    kit.run_all()
    assert kit.installed["trust"] == "medium"  # no trust request: the default a pip-installed plugin gets
    assert kit.installed["isolated"] is True

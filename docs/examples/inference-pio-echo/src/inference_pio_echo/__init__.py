"""An example inference-pio plugin: echoes the user's words back."""

from inference_pio_echo.plugin import EchoPlugin, create_echo_plugin

__all__ = ["EchoPlugin", "create_echo_plugin"]

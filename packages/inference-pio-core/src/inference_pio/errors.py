"""Exceptions raised by inference-pio.

Every message says what went wrong, with the names and sizes involved, and what to do next.
All derive from :class:`InferencePIOError` so callers can catch one type.
"""

from __future__ import annotations


class InferencePIOError(Exception):
    """Base class of every error inference-pio raises on purpose."""


class PluginNotFoundError(InferencePIOError, KeyError):
    """No plugin of that name is installed or registered."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class PluginLoadError(InferencePIOError):
    """A plugin failed to import, register or load; ``original`` is the exception behind it."""

    def __init__(self, message: str, original: BaseException | None = None) -> None:
        super().__init__(message)
        self.original = original
        if original is not None:
            self.__cause__ = original


class PluginConflictError(PluginLoadError):
    """Two sources registered the same plugin name."""


class PluginIncompatibleError(PluginLoadError):
    """The plugin supports a plugin-API range that excludes this core."""


class PluginDisabledError(InferencePIOError):
    """The plugin is installed but switched off by INFERENCE_PIO_PLUGINS / INFERENCE_PIO_DISABLE_PLUGINS."""


class PluginNotActiveError(InferencePIOError):
    """The plugin must be activated (``activate_plugin``) before it can execute."""


class MetadataError(InferencePIOError, ValueError):
    """A plugin's metadata is invalid; the message names the field."""


class ConfigError(InferencePIOError, ValueError):
    """A configuration value is invalid or unknown; the message names the key and its source."""


class InsufficientMemoryError(InferencePIOError):
    """The model does not fit the target device in any precision the plugin supports."""


class InvalidRequestError(InferencePIOError, ValueError):
    """The caller's input (prompt, messages, images, parameters) is invalid; ``param`` names which."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextLengthError(InvalidRequestError):
    """The prompt plus the requested new tokens exceed the model's context window."""


class ModelLoadError(InferencePIOError):
    """Weights or tokenizer could not be loaded from the given path or hub id."""


class ResourceLimitExceeded(InferencePIOError):
    """An isolated plugin went over one of its resource limits; its worker was ended.

    ``limit`` names the limit (``memory``, ``cpu_seconds``, ``disk_write_bytes``, ``open_files``,
    ``wall_seconds``) and ``value`` its configured value.
    """

    def __init__(self, message: str, limit: str, value: float | int | None) -> None:
        super().__init__(message)
        self.limit = limit
        self.value = value


class PathNotAllowedError(InferencePIOError, PermissionError):
    """A path is outside the roots a plugin's trust level allows, or is unsafe to load from."""


class QueueFullError(InferencePIOError):
    """Every slot is busy and the waiting queue is full; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SchedulerStoppedError(InferencePIOError):
    """The scheduler is shutting down and accepts no new requests."""

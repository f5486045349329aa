"""Shared building blocks: metadata, interfaces, configuration. Light: no torch here."""

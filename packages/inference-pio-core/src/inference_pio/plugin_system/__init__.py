"""Discovery, registration and lifecycle of plugins. Light: no torch here."""

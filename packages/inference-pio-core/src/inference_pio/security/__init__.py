"""Trust levels, resource limits, path validation and the isolated worker. See docs/security.md."""

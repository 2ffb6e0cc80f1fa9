"""The healer: crash-loop detection and node-loss verdicts, each one an event."""

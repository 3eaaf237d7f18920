"""The relay as composition root: workers, outcomes, hand-off, metrics, logs."""

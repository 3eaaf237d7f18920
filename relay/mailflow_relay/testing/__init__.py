"""Helpers for tests and the demo: an SMTP sink that records what it receives."""

"""The ``mailflow`` command: each subcommand's module is imported only when it runs."""

__version__ = "0.1.0"

"""The package version (one place; the trace metadata records it)."""

__version__ = "0.1.0"

"""The package version (one place, imported by the layers that record it)."""

__version__ = "0.1.0"

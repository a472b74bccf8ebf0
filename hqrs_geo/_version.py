"""The package version (one place; read by setuptools and by the run records)."""

__version__ = "0.1.0"

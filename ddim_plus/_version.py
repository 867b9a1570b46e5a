"""The package version, in a module of its own so that hub.py and pyproject.toml read it without importing the
pipelines."""

__version__ = "0.1.0"

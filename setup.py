# The metadata lives in pyproject.toml (PEP 621); this shim keeps `python setup.py ...` and old pip versions working.
from setuptools import setup

setup()

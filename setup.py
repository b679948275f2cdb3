"""The conventional entry point, for tools that still look for setup.py.

Every piece of metadata lives in pyproject.toml (PEP 621); ``pip install .``
reads it there, and ``python setup.py …`` reaches the same configuration
through setuptools.
"""

from setuptools import setup

setup()

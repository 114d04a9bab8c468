# All metadata and dependencies live in pyproject.toml; this shim keeps
# `pip install -e .` working with older tooling. Do not add settings here.
from setuptools import setup

setup()

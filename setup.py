"""The one compiled part built at install: the SIGBUS guard (src/pyvhost/_sigbus.c); the rest is in pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("pyvhost._sigbus", ["src/pyvhost/_sigbus.c"], extra_compile_args=["-O2", "-Wall"])])

"""Package metadata lives in pyproject.toml; this file exists for the ahead-of-time CUDA build that
the CUDA backend adds (PTV2_BUILD_CUDA=1). Without it nothing here imports torch."""

from setuptools import setup

setup()

"""pytest-benchmark suites of the ``ptv2-bench`` cases (``pytest benchmarks/``; not part of the default
test run, whose testpaths is ``tests``). ``PTV2_BENCH_DEVICE`` picks the device (default: cuda if
available, else cpu); shapes are the ``ptv2-bench`` defaults of that device (``--quick`` ones on the CPU
unless ``PTV2_BENCH_FULL=1``); ``PTV2_BENCH_MODEL`` picks the embedded config (default bert-base; a DeBERTa
config adds its c2p/p2c terms)."""

import os

import pytest
import torch

from ptv2_kernels.bench.configs import DEFAULT_MODEL, DEFAULT_SIZES, QUICK_SIZES, heads_and_dim


def bench_device() -> torch.device:
    name = os.environ.get("PTV2_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def bench_sizes():
    device = bench_device()
    full = device.type == "cuda" or os.environ.get("PTV2_BENCH_FULL") == "1"
    return DEFAULT_SIZES[device.type] if full else QUICK_SIZES


@pytest.fixture
def device() -> torch.device:
    return bench_device()


@pytest.fixture
def model_shape():
    """(model name, H, D) of the embedded config ``PTV2_BENCH_MODEL`` (default: the default model)."""
    model = os.environ.get("PTV2_BENCH_MODEL", DEFAULT_MODEL)
    return (model, *heads_and_dim(model))

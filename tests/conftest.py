"""Shared fixtures: one tiny random model per supported family, saved to disk and loaded back.

The builders behind every fixture (tiny models, random SAEs of each architecture, HF's own attention
numbers, the jobs' and the server's setups on disk) live in `qktrace.testing`; test modules import those
and these fixtures, never each other."""

from __future__ import annotations

import logging
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
logging.getLogger("transformers").setLevel(logging.ERROR)

import torch  # noqa: E402

from qktrace.testing import TINY_FAMILIES, make_tiny_model  # noqa: E402

# tiny tensors: one thread is faster than two fighting each other (and a background training run)
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {f: make_tiny_model(f, root / f, seed=i) for i, f in enumerate(TINY_FAMILIES)}


@pytest.fixture(scope="session")
def tiny_models(tiny_paths):
    from qktrace.models import load_model

    return {f: load_model(p) for f, p in tiny_paths.items()}


@pytest.fixture(params=TINY_FAMILIES)
def family(request):
    return request.param

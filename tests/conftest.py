"""Shared fixtures: tiny, randomly initialised but real pipelines built offline."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
# the processes tests start (console scripts, Ray's workers) take one thread too: `make test` runs two
# pytest workers on the CI's two cores, and a third process spinning on both would stall them
os.environ.setdefault("OMP_NUM_THREADS", "1")
# One intra-op thread: tiny models gain nothing from more, a busy 2-core machine
# slows two spinning threads per process badly, and one thread keeps runs bitwise
# comparable (resume tests compare weights exactly).
torch.set_num_threads(1)

WORDS = ["a", "photo", "of", "the", "digit", "eight", "three", "one", "dog", "cat"]


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A saved tiny SD-1.x pipeline folder (random weights)."""
    from metaunlearn.worlds.pipeline import TinyPipelineConfig, build_pipeline

    folder = tmp_path_factory.mktemp("tiny") / "pipeline"
    build_pipeline(TinyPipelineConfig(), WORDS, seed=0).save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_model(tiny_pipeline_dir):
    from metaunlearn import DiffusionModel

    return DiffusionModel.load(tiny_pipeline_dir)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Worlds built by tests go to a temporary cache, never the user's."""
    monkeypatch.setenv("METAUNLEARN_CACHE", str(tmp_path / "cache"))

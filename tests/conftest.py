"""Fixtures shared by the test files: the tiny random models, built once per session, and their saved
Hugging Face directories. Tests must not leave a plan applied or change a shared model's weights; a test
that needs a changed model builds its own (allocmoe.testing.tiny_model)."""

import logging

import pytest
import torch

from allocmoe.testing import FAMILIES, save_tiny, tiny_model

logging.getLogger("transformers").setLevel(logging.ERROR)
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def models():
    """One tiny model per family, built once (tests must not leave a plan applied)."""
    return {f: tiny_model(f) for f in FAMILIES}


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """tiny_dir(family) -> the family's tiny model (same weights as `models`) saved with the tiny tokenizer as a
    Hugging Face directory, saved once per session. Read-only: a test that writes beside a model copies it."""
    root = tmp_path_factory.mktemp("tiny-models")
    saved: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in saved:
            saved[family] = save_tiny(family, root / family)
        return saved[family]

    return get


@pytest.fixture
def ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 97, (2, 12), generator=g)

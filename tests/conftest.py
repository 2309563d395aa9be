import logging

import pytest
import torch

from allocmoe.testing import FAMILIES, tiny_model

logging.getLogger("transformers").setLevel(logging.ERROR)
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def models():
    """One tiny model per family, built once (tests must not leave a plan applied)."""
    return {f: tiny_model(f) for f in FAMILIES}


@pytest.fixture
def ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 97, (2, 12), generator=g)

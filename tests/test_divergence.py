"""The one KL implementation shared by profiling, plan search and compensation selection."""

import pytest
import torch
import torch.nn.functional as F

from allocmoe.divergence import Reference


def test_kl_matches_torch_and_is_exactly_zero_against_itself():
    g = torch.Generator().manual_seed(0)
    full, cand = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    ref = Reference.of(full)
    assert ref.kl_sum(full) == 0.0  # the full plan scores exactly 0
    kl, logp = ref.kl(cand)
    want = F.kl_div(F.log_softmax(cand, -1), F.log_softmax(full, -1), log_target=True, reduction="none").sum(-1)
    assert kl.shape == (2, 5) and torch.allclose(kl, want, atol=1e-6) and (kl > 0).all()
    assert torch.allclose(logp, F.log_softmax(cand, -1))
    assert ref.head(1).kl_sum(cand[:1]) == pytest.approx(float(kl[0].double().sum()))

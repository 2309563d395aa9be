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


class _Toy(torch.nn.Module):
    """A model-shaped stub: logits = embedding(ids) * scale, so its distribution can be changed on purpose."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(13, 7)
        torch.nn.init.normal_(self.emb.weight, generator=torch.Generator().manual_seed(1))
        self.scale = 1.0
        self.seen = []

    def forward(self, input_ids, use_cache=None):
        self.seen.append((input_ids.shape[0], use_cache, input_ids.device))
        return type("Out", (), {"logits": self.emb(input_ids) * self.scale})()


def test_shared_batched_kl_loop_matches_a_direct_computation():
    from allocmoe.divergence import batches, mean_kl, model_device, references

    m = _Toy()
    w = torch.randint(0, 13, (5, 4), generator=torch.Generator().manual_seed(2))
    assert [b.shape[0] for b in batches(w, 2)] == [2, 2, 1]
    assert model_device(m) == torch.device("cpu")
    refs = references(m, w, 2, device="cpu")
    assert len(refs) == 3 and mean_kl(m, w, refs, 2) == 0.0  # the model against itself
    assert all(bs <= 2 and use_cache is False for bs, use_cache, _ in m.seen)
    m.scale = 2.0
    with torch.no_grad():
        full, cand = _Toy().emb(w), m.emb(w) * 2.0  # the same seeded weights, at scale 1 and 2
    want = F.kl_div(F.log_softmax(cand, -1), F.log_softmax(full, -1), log_target=True, reduction="none").sum(-1)
    assert mean_kl(m, w, refs, 2) == pytest.approx(float(want.double().mean()), rel=1e-6)
    # a prefix of the windows (the plan search's low-fidelity score) uses the head of the last reference
    assert mean_kl(m, w[:3], refs, 2) == pytest.approx(float(want[:3].double().mean()), rel=1e-6)

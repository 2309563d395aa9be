"""apply(): exactness at full K, real savings and exact counts below K, the global policy, padding, generate."""

import itertools

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import allocmoe
from allocmoe import policies
from allocmoe.testing import FAMILIES, tiny_model


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_full_k_fixed_is_bitwise_identical_and_removal_restores(models, ids, family):
    m = models[family]
    ref = logits(m, ids)
    with allocmoe.apply(m, allocmoe.full_plan(m)) as h:
        out = logits(m, ids)
        counts = h.counts()
    assert torch.equal(out, ref)  # bitwise: the dense path calls the stock experts forward unchanged
    assert torch.equal(logits(m, ids), ref)
    L = len(allocmoe.find_moe_layers(m))
    assert counts["last"]["pairs_per_layer"] == [ids.numel() * 4] * L
    assert counts["last"]["activations_per_token"] == 4 * L


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_same_tokens_at_full_k(models, family):
    m = models[family]
    prompt = torch.tensor([[5, 17, 33, 8]])
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = m.generate(prompt, **kw)
        with allocmoe.apply(m, allocmoe.full_plan(m)):
            out = m.generate(prompt, **kw)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_reduced_k_counts_exact_pairs(models, ids, family):
    m = models[family]
    L = len(allocmoe.find_moe_layers(m))
    ks = [1, 3, 2][:L]
    with allocmoe.apply(m, allocmoe.make_plan(m, ks)) as h:
        out = logits(m, ids)
        c = h.counts()
        logits(m, ids)
        c2 = h.counts()
    assert torch.isfinite(out).all()
    T = ids.numel()
    assert c["last"]["pairs_per_layer"] == [k * T for k in ks]
    assert c["last"]["activations_per_token"] == sum(ks)
    assert c2["cumulative"]["pairs_per_layer"] == [2 * k * T for k in ks]
    assert sum(map(sum, h.expert_load())) == 2 * sum(ks) * T


def _expert_flops_per_pair(layer):
    ex = layer.experts
    return 2 * (ex.gate_up_proj[0].numel() + ex.down_proj[0].numel())


@pytest.mark.parametrize("family", ["deepseek_v2", "qwen3_moe", "mixtral"])
@pytest.mark.parametrize("policy", ["fixed", "global"])
def test_flops_fall_by_expert_fraction(family, policy, ids):
    m = tiny_model(family)
    m.config._experts_implementation = "eager"  # FlopCounterMode sees F.linear, not the grouped-mm kernel
    layers = allocmoe.find_moe_layers(m)

    def flops():
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            m(ids)
        return fc.get_total_flops()

    full = flops()
    ks = [2] * len(layers)
    with allocmoe.apply(m, allocmoe.make_plan(m, ks, token_policy=policy)):
        half = flops()
    saved = sum(ids.numel() * (l.top_k - k) * _expert_flops_per_pair(l) for l, k in zip(layers, ks))
    assert full - half == saved
    assert saved > 0.1 * full  # the cut is a visible share of this tiny model's compute (LM head dominates)


def brute_force_global(scores, k, min_k, max_k):
    """Best total score over all per-token counts in [min_k, max_k] summing to k*T (top-c per token)."""
    T = scores.shape[0]
    srt = scores.sort(dim=-1, descending=True).values
    best, arg = None, None
    for counts in itertools.product(range(min_k, max_k + 1), repeat=T):
        if sum(counts) != k * T:
            continue
        tot = sum(srt[t, :c].sum().item() for t, c in enumerate(counts))
        if best is None or tot > best + 1e-12:
            best, arg = tot, counts
    return arg


@pytest.mark.parametrize("seed", range(20))
def test_global_selection_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    T, E = 4, 6
    k, min_k, max_k = [(2, 1, 4), (3, 1, 5), (2, 2, 3), (1, 1, 3)][seed % 4]
    scores = torch.rand(T, E, generator=g).softmax(-1)
    vals, ids = policies.sorted_candidates(scores, max_k)
    counts = policies.global_counts(vals, k, min_k, None)
    assert counts.sum().item() == k * T
    assert counts.min() >= min_k and counts.max() <= max_k
    assert tuple(counts.tolist()) == brute_force_global(scores, k, min_k, max_k)
    idx = policies.prefix_index(ids, counts)
    for t in range(T):  # each token keeps its best experts
        kept = set(idx[t][idx[t] >= 0].tolist())
        assert kept == set(scores[t].topk(int(counts[t])).indices.tolist())


@pytest.mark.parametrize("family", FAMILIES)
def test_global_policy_in_model(models, ids, family):
    m = models[family]
    L = len(allocmoe.find_moe_layers(m))
    plan = allocmoe.make_plan(m, [2] * L, token_policy={"name": "global", "min_k": 1, "max_k": 4})
    with allocmoe.apply(m, plan, record=True) as h:
        logits(m, ids)
        c = h.counts()
        per_token = [(h.last_selection(l) >= 0).sum(-1) for l in range(L)]
    assert c["last"]["pairs_per_layer"] == [2 * ids.numel()] * L
    for n in per_token:
        assert n.min() >= 1 and n.max() <= 4
    assert any(n.max() > 2 for n in per_token)  # tokens really get different counts


@pytest.mark.parametrize("family", ["deepseek_v2", "qwen2_moe", "gpt_oss"])
def test_padding_takes_no_budget(models, family):
    m = models[family]
    L = len(allocmoe.find_moe_layers(m))
    g = torch.Generator().manual_seed(1)
    real = torch.randint(3, 97, (2, 10), generator=g)
    padded = torch.cat([real, torch.zeros(2, 10, dtype=torch.long)])
    mask = torch.cat([torch.ones(2, 10, dtype=torch.long), torch.zeros(2, 10, dtype=torch.long)])
    plan = allocmoe.make_plan(m, [2] * L, token_policy="global")
    with allocmoe.apply(m, plan, record=True) as h:
        a = logits(m, real, attention_mask=torch.ones_like(real))
        sel_a = [h.last_selection(l).clone() for l in range(L)]
        b = logits(m, padded, attention_mask=mask)
        sel_b = [h.last_selection(l) for l in range(L)]
        c = h.counts()
    for x, y in zip(sel_a, sel_b):
        w = x.shape[1]
        assert torch.equal(x, y[:20, :w]) and (y[:20, w:] == -1).all()
        assert (y[20:] == -1).all()  # padding rows run no expert
    assert c["last"]["pairs_per_layer"] == [2 * 20] * L and c["last"]["tokens"] == 20
    assert torch.allclose(a, b[:2], atol=1e-5)


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe", "granitemoe"])
@pytest.mark.parametrize(
    "policy",
    [{"name": "fixed"}, {"name": "global"}, {"name": "threshold"}, {"name": "top-p", "p": 0.6},
     {"name": "naee", "beta": 0.3}],
)
@pytest.mark.parametrize("renorm", ["native", "renorm", "keep-mass"])
def test_generate_works_under_every_policy(models, family, policy, renorm):
    m = models[family]
    L = len(allocmoe.find_moe_layers(m))
    params = [{"threshold": 0.1}] * L if policy["name"] == "threshold" else None
    plan = allocmoe.make_plan(m, [2] * L, token_policy=dict(policy), renormalize=renorm, layer_params=params)
    prompt = torch.tensor([[5, 17, 33, 8], [0, 0, 9, 4]])
    with allocmoe.apply(m, plan) as h, torch.no_grad():
        out = m.generate(prompt, attention_mask=(prompt != 0).long(), max_new_tokens=4, do_sample=False,
                         pad_token_id=0)
        c = h.counts()
    assert out.shape == (2, 8)
    assert 1 <= c["cumulative"]["activations_per_token"] / L <= 4
    if policy["name"] in ("fixed", "global"):
        assert c["cumulative"]["activations_per_token"] == 2 * L


def test_batch1_decode_global_equals_fixed(models):
    m = models["qwen3_moe"]
    L = 3
    prompt = torch.tensor([[5, 17, 33, 8]])
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with allocmoe.apply(m, allocmoe.make_plan(m, [2] * L, renormalize="renorm")):
            a = m.generate(prompt, **kw)
        with allocmoe.apply(m, allocmoe.make_plan(m, [2] * L, token_policy={"name": "global", "max_k": 2},
                                                  renormalize="renorm")):
            b = m.generate(prompt, **kw)
    assert torch.equal(a, b)


def test_renorm_modes_differ_only_where_family_does_not_renormalise(models, ids):
    m = models["deepseek_v2"]  # never renormalises natively
    plans = {r: allocmoe.make_plan(m, [2, 2], renormalize=r) for r in ("native", "renorm", "keep-mass")}
    outs = {}
    for r, p in plans.items():
        with allocmoe.apply(m, p):
            outs[r] = logits(m, ids)
    assert not torch.allclose(outs["native"], outs["renorm"])
    assert not torch.allclose(outs["native"], outs["keep-mass"])
    q = models["mixtral"]  # always renormalises: native == renorm == keep-mass
    o = []
    for r in ("native", "renorm", "keep-mass"):
        with allocmoe.apply(q, allocmoe.make_plan(q, [2, 2, 2], renormalize=r)):
            o.append(logits(q, ids))
    assert torch.allclose(o[0], o[1], atol=1e-6) and torch.allclose(o[0], o[2], atol=1e-6)


def test_double_apply_refused_and_handle_idempotent(models):
    m = models["olmoe"]
    h = allocmoe.apply(m, allocmoe.full_plan(m))
    try:
        with pytest.raises(allocmoe.AllocMoeError, match="already applied"):
            allocmoe.apply(m, allocmoe.full_plan(m))
    finally:
        h.remove()
    h.remove()
    assert allocmoe.applied_plan(m) is None


def test_keep_weights_keeps_each_kept_experts_full_model_weight(models, ids):
    import math

    # a renormalising family: at full K keep-weights is the family's own output; below it the kept experts'
    # weights are not scaled up, unlike native (renormalised over the kept ones)
    q = models["mixtral"]
    K = allocmoe.find_moe_layers(q)[0].top_k
    L = len(allocmoe.find_moe_layers(q))
    with torch.no_grad():
        ref = logits(q, ids)
        with allocmoe.apply(q, allocmoe.make_plan(q, [K] * L, renormalize="keep-weights")):
            full = logits(q, ids)
        assert torch.allclose(full, ref, atol=1e-6)
        outs = {}
        for r in ("native", "keep-weights"):
            with allocmoe.apply(q, allocmoe.make_plan(q, [1] * L, renormalize=r)):
                outs[r] = logits(q, ids)
    assert not torch.allclose(outs["native"], outs["keep-weights"])
    # the mixing weight itself: top-1 of a top-K softmax keeps p1 / (p1 + ... + pK), not 1
    from allocmoe import patching

    class _Adapter:
        def renormalises(self, router):
            return True

        def scaling_factor(self, router):
            return 1.0

    class _Scores:
        weight = torch.tensor([[0.5, 0.3, 0.2]])
        rank = weight

    w = patching._mix_weights(_Adapter(), None, _Scores(), torch.tensor([[0, -1]]), "keep-weights", 2)
    assert math.isclose(float(w[0, 0]), 0.5 / 0.8, rel_tol=1e-6) and float(w[0, 1]) == 0.0
    m = models["deepseek_v2"]  # never renormalises: keep-weights is native
    with torch.no_grad():
        a = [None, None]
        for i, r in enumerate(("native", "keep-weights")):
            with allocmoe.apply(m, allocmoe.make_plan(m, [2, 2], renormalize=r)):
                a[i] = logits(m, ids)
    assert torch.equal(a[0], a[1])

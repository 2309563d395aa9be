"""Paired bootstrap over evaluation windows (uncertainty.py), per-window NLLs from evaluate(), report marks."""

import math

import numpy as np
import pytest

import allocmoe
from allocmoe.report import markdown_report
from allocmoe.testing import tiny_model, tiny_tokenizer
from allocmoe.uncertainty import Bootstrap, paired_interval, resolved_ranks

TOKENS = [32] * 40


def _nll(seed: int, per_token: float = 3.0, spread: float = 0.3) -> list[float]:
    rng = np.random.default_rng(seed)
    return list(np.asarray(TOKENS) * (per_token + spread * rng.standard_normal(len(TOKENS))))


def _jitter(a: list[float], seed: int, scale: float = 0.05) -> list[float]:
    """a with zero-mean noise per window (scale nats per token): no real difference, but not the same."""
    rng = np.random.default_rng(seed)
    e = rng.standard_normal(len(a))
    return [x + scale * t * (v - e.mean()) for x, t, v in zip(a, TOKENS, e)]


def test_identical_configurations_are_not_told_apart():
    a = _nll(0)
    iv = paired_interval(a, list(a), TOKENS)
    assert iv["delta"] == 0 and iv["low"] <= 0 <= iv["high"] and not iv["resolved"]
    assert iv["windows"] == 40 and iv["level"] == 0.95


def test_a_clear_difference_is_resolved_and_a_small_one_is_not():
    a = _nll(0)
    worse = [x + 0.05 * t for x, t in zip(a, TOKENS)]  # paired: a's windows, +0.05 nats/token
    iv = paired_interval(a, worse, TOKENS)
    assert iv["delta"] == pytest.approx(math.expm1(0.05)) and iv["low"] > 0 and iv["resolved"]
    # a difference far below the windows' noise: the interval contains 0
    rng = np.random.default_rng(5)
    noisy = [x + t * 0.2 * rng.standard_normal() for x, t in zip(a, TOKENS)]
    noisy = [x - (sum(noisy) - sum(a)) / len(a) + 0.001 * t for x, t in zip(noisy, TOKENS)]  # mean shift 0.001
    iv = paired_interval(a, noisy, TOKENS)
    assert 0 < iv["delta"] < 0.002 and iv["low"] < 0 < iv["high"] and not iv["resolved"]


def test_bootstrap_is_seeded_and_checks_its_inputs():
    a, b = _nll(0), _nll(1)
    assert paired_interval(a, b, TOKENS, seed=3) == paired_interval(a, b, TOKENS, seed=3)
    assert paired_interval(a, b, TOKENS, seed=3) != paired_interval(a, b, TOKENS, seed=4)
    with pytest.raises(ValueError, match="at least 2 windows"):
        Bootstrap([5])
    with pytest.raises(ValueError, match="expected 40 window NLLs"):
        Bootstrap(TOKENS).nll_sums([1.0, 2.0])


def test_ranks_claim_only_resolved_orders():
    a = _nll(0)
    same = list(a)
    worse = [x + 0.1 * t for x, t in zip(a, TOKENS)]
    assert resolved_ranks([worse, a, same], TOKENS) == [3, 1, 1]


def test_evaluate_returns_per_window_nll_sums():
    m, tok = tiny_model("qwen3_moe"), tiny_tokenizer()
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 3
    r = allocmoe.evaluate(m, tokenizer=tok, texts=[text], seq_len=32)
    assert len(r["window_nll"]) == len(r["window_tokens"]) > 2
    assert sum(r["window_tokens"]) == r["tokens"]
    assert math.fsum(r["window_nll"]) / r["tokens"] == pytest.approx(r["nll"], rel=1e-12)


def _results(configs):
    full = {"label": "full model", "method": "full", "policy": "fixed", "budget": 1.0, "perplexity": 10.0,
            "bits_per_byte": 1.0, "tokens": 1280, "tasks": {}, "activations_per_token": 8.0, "ks": [4, 4]}
    return {"model": {"architecture": "A", "path": "p", "moe_layers": 2, "num_experts": 8, "top_k": 4,
                      "shared_experts": 0, "activations_per_token": 8},
            "settings": {"metric": "kl", "calibration_tokens": 10, "profile_seconds": 1.0,
                         "validation_files": ["v.txt"], "seq_len": 32, "budgets": [0.5]},
            "configs": [full] + configs}


def _config(label, method, nll, **kw):
    ppl = math.exp(sum(nll) / sum(TOKENS))
    return dict(label=label, method=method, policy="fixed", budget=0.5, perplexity=ppl, bits_per_byte=1.0,
                tokens=sum(TOKENS), tasks={}, activations_per_token=4.0, ks=[2, 2], window_nll=nll,
                window_tokens=TOKENS, **kw)


def test_report_marks_unresolved_differences_and_shares_ranks():
    a = _nll(0)
    md = markdown_report(_results([
        _config("uniform", "uniform", a),
        _config("dp", "dp", _jitter(a, 7)),  # no real difference
        _config("random", "random", [x + 0.1 * t for x, t in zip(a, TOKENS)]),  # clearly worse
    ]))
    assert "Δ vs uniform (95% CI)" in md and "paired-bootstrap" in md
    lines = md.splitlines()
    uni = next(l for l in lines if "| uniform |" in l)
    dp = next(l for l in lines if "| dp |" in l)
    rnd = next(l for l in lines if "| random |" in l)
    assert uni.startswith("| =1 |") and dp.startswith("| =1 |") and rnd.startswith("| 3 |")
    assert "(reference)" in uni and "≈" in dp and "≈" not in rnd and "+10.5% [" in rnd
    # a configuration whose allocation the plan guard replaced says so
    md = markdown_report(_results([_config("uniform", "uniform", a), _config("dp", "dp", list(a), guard="uniform")]))
    assert "| dp (guard: uniform) |" in md


def test_report_without_window_data_keeps_plain_ranks():
    a = _nll(0)
    c = [_config("uniform", "uniform", a), _config("dp", "dp", [x + 1e-9 for x in a])]
    for r in c:
        del r["window_nll"]
    md = markdown_report(_results(c))
    assert "Δ vs uniform" not in md and next(l for l in md.splitlines() if "| dp |" in l).startswith("| 2 |")

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf

import allocmoe
from allocmoe.errors import AllocMoeError, DataError, FileFormatError
from allocmoe.evaluation import load_task, perplexity, score_task
from allocmoe.testing import bpe_tokenizer, tiny_model

TASKS = Path(allocmoe.__file__).parent / "assets" / "tasks"
CORPUS = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of "
    "a wife.",
    "In the beginning God created the heaven and the earth. And the earth was without form, and void.",
    "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition. Café naïveté, señor.",
]


def make_tokenizer(bos: bool = True) -> tf.PreTrainedTokenizerFast:
    """A byte-level BPE (~300 tokens) trained on CORPUS: multi-byte tokens and split UTF-8 characters."""
    return bpe_tokenizer(CORPUS, bos=bos)


def make_model(vocab_size: int = 300, seed: int = 0) -> torch.nn.Module:
    return tiny_model("qwen3_moe", seed=seed, num_layers=2, num_experts=4, top_k=2, vocab_size=vocab_size,
                      max_position_embeddings=256)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(bos=True)


@pytest.fixture(scope="module")
def tok_nobos():
    return make_tokenizer(bos=False)


@pytest.fixture(scope="module")
def model():
    return make_model()


def enc(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def logprobs(model, ids):
    """log p(ids[i+1] | ids[:i+1]) for every i, from one unpadded forward."""
    lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return [lp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]


# -----------------------------------------------------------------------------
# perplexity


def test_perplexity_matches_hand_computed(model, tok):
    text = CORPUS[2]
    ids = [tok.bos_token_id] + enc(tok, text)
    lps = logprobs(model, ids)
    nll = -sum(lps) / len(lps)
    r = perplexity(model, tok, text, seq_len=128, progress=False)
    assert r["tokens"] == len(ids) - 1 and r["windows"] == 1
    assert r["nll"] == pytest.approx(nll, abs=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)
    # with a BOS every text token is scored, so the bytes are the whole text's (it has 2-byte characters)
    assert r["bytes"] == len(text.encode("utf-8")) > len(text)
    assert r["bits_per_byte"] == pytest.approx(-sum(lps) / math.log(2) / r["bytes"], rel=1e-5)
    assert set(r) >= {"perplexity", "nll", "bits_per_byte", "tokens", "windows", "seq_len", "stride"}


def hand_windowed_nll(model, ids, seq_len, stride):
    """Target j is scored in the first window (begins 0, stride, ...) whose predictions reach j; its context
    is ids[begin:j]. One forward per target: slow but independent of the implementation."""
    total = 0.0
    for j in range(1, len(ids)):
        begin = max(0, math.ceil((j - seq_len) / stride)) * stride
        total += logprobs(model, ids[begin:j + 1])[-1]
    return -total / (len(ids) - 1)


@pytest.mark.parametrize("seq_len,stride,windows", [(8, None, 9), (8, 4, 17), (8, 1, 65), (128, None, 1)])
def test_perplexity_stride(model, tok_nobos, seq_len, stride, windows):
    text = CORPUS[0]
    ids = enc(tok_nobos, text)
    assert len(ids) == 73  # 72 targets: the window counts below depend on it
    r = perplexity(model, tok_nobos, text, seq_len=seq_len, stride=stride, batch_size=8, progress=False)
    # no BOS: every token but the first is scored once, whatever the stride
    assert r["tokens"] == len(ids) - 1 and r["windows"] == windows
    assert r["stride"] == (stride or seq_len) and r["seq_len"] == seq_len
    assert r["nll"] == pytest.approx(hand_windowed_nll(model, ids, seq_len, stride or seq_len), abs=1e-5)
    first = len(tok_nobos.decode(ids[:1]).encode())
    assert r["bytes"] == len(text.encode()) - first


def test_perplexity_padding_invariant(model, tok):
    # texts of different lengths, short windows: the batched run pads most rows
    a = perplexity(model, tok, CORPUS, seq_len=24, batch_size=1, progress=False)
    b = perplexity(model, tok, CORPUS, seq_len=24, batch_size=8, progress=False)
    assert a["tokens"] == b["tokens"] and a["windows"] == b["windows"] > 3
    assert b["perplexity"] == pytest.approx(a["perplexity"], rel=1e-5, abs=1e-5)
    assert b["bits_per_byte"] == pytest.approx(a["bits_per_byte"], rel=1e-5)


def test_perplexity_max_tokens_and_restores_mode(model, tok):
    model.train()
    r = perplexity(model, tok, CORPUS, seq_len=16, max_tokens=20, progress=False)
    assert model.training
    model.eval()
    ids = [tok.bos_token_id] + enc(tok, CORPUS[0])
    lps = logprobs(model, ids[:17]) + logprobs(model, ids[16:21])  # reads ids[0:16], then ids[16:20]
    assert r["tokens"] == 20 and r["windows"] == 2
    assert r["nll"] == pytest.approx(-sum(lps) / 20, abs=1e-5)
    assert r["bytes"] == len(tok.decode(ids[1:21]).encode())


def test_perplexity_errors(model, tok, tok_nobos):
    for texts in ["", [], ["", ""]]:
        with pytest.raises(DataError, match="is empty") as e:
            perplexity(model, tok, texts, progress=False)
        assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="too short") as e:
        perplexity(model, tok_nobos, "a", progress=False)
    assert "\n" not in str(e.value)
    # a one-token text is fine with a BOS (the token is scored after it), and short texts are skipped in a list
    assert perplexity(model, tok, "a", progress=True)["tokens"] == 1
    assert perplexity(model, tok_nobos, ["a", "", CORPUS[0]], progress=False)["tokens"] == 72


# -----------------------------------------------------------------------------
# multiple choice


def hand_loglik(model, tokenizer, context, choice):
    """lm-eval's recipe, written out: continuation = " " + choice; tokens after len(tokenize(context))."""
    bos = [tokenizer.bos_token_id]
    if not context:
        ctx, cont = bos, enc(tokenizer, choice)
    else:
        if context.endswith(" "):
            context, choice = context[:-1], " " + choice
        else:
            choice = " " + choice
        ctx = bos + enc(tokenizer, context)
        cont = (bos + enc(tokenizer, context + choice))[len(ctx):]
    return sum(logprobs(model, ctx + cont)[len(ctx) - 1:])


TOY = {"name": "toy", "examples": [
    {"input": "In the beginning God created", "target_scores": {"the heaven": 1, "a wife": 0, "Café": 0}},
    {"input": "It is a truth universally ", "target_scores": {"acknowledged": 1, "void": 0}},
    {"input": "", "target_scores": {"And the earth was without form.": 0, "And the earth form was without.": 1}},
    {"input": "Emma was", "target_scores": {"handsome": 1, "clever": 1, "rich and happy": 0}},
]}


def test_score_task_matches_hand_computed(model, tok):
    r = score_task(model, tok, TOY, batch_size=16, progress=False)
    assert r["name"] == "toy" and r["n"] == 4
    acc = acc_norm = 0
    for ex, d in zip(TOY["examples"], r["details"]):
        choices = list(ex["target_scores"])
        ll = [hand_loglik(model, tok, ex["input"], c) for c in choices]
        assert d["choices"] == choices
        assert d["loglik"] == pytest.approx(ll, abs=1e-4)
        best = max(ex["target_scores"].values())
        pred = max(range(len(ll)), key=ll.__getitem__)
        pred_norm = max(range(len(ll)), key=lambda i: ll[i] / len(choices[i].encode()))
        assert (d["pred"], d["pred_norm"]) == (pred, pred_norm)
        acc += ex["target_scores"][choices[pred]] == best
        acc_norm += ex["target_scores"][choices[pred_norm]] == best
    assert r["accuracy"] == acc / 4 and r["accuracy_norm"] == acc_norm / 4
    assert r["chance"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 2 + 2 / 3) / 4)
    # padding-aware: one example per batch gives the same scores
    r1 = score_task(model, tok, TOY, batch_size=1, progress=False)
    for d, d1 in zip(r["details"], r1["details"]):
        assert d1["loglik"] == pytest.approx(d["loglik"], abs=1e-5)


def test_shipped_tasks_load_and_score(model, tok):
    hb = load_task(TASKS / "hyperbaton.json")
    assert hb["name"] == "hyperbaton" and "canary GUID" in hb["canary"]
    assert len(hb["examples"]) == 200
    answers = [max(e["target_scores"], key=e["target_scores"].get) for e in hb["examples"]]
    assert all(set(e["target_scores"]) == {"a", "b"} for e in hb["examples"])
    assert answers.count("a") == answers.count("b") == 100
    assert all(e["input"].startswith("Which sentence has the correct adjective order:") for e in hb["examples"])
    ce = load_task(TASKS / "cause_and_effect.json")
    assert ce["name"] == "cause_and_effect:one_sentence_no_prompt" and len(ce["examples"]) == 51
    assert "canary GUID" in ce["canary"]
    assert (TASKS / "SOURCES.md").read_text().count("Apache") >= 1
    r = score_task(model, tok, TASKS / "hyperbaton.json", max_examples=8, progress=False)
    assert r["n"] == 8 and 0 <= r["accuracy"] <= 1 and r["chance"] == 0.5


@pytest.mark.parametrize("content,match", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "no 'examples' list"),
    ('{"examples": []}', "no examples"),
    ('{"examples": [{"target_scores": {"a": 1, "b": 0}}]}', "example 0 has no string 'input'"),
    ('{"examples": [{"input": "x", "target": "y"}]}', "example 0 needs 'target_scores'"),
    ('{"examples": [{"input": "x", "target_scores": {"a": 1}}]}', "at least 2 choices"),
    ('{"examples": [{"input": "x", "target_scores": {"a": "1", "b": 0}}]}', "not a finite number"),
])
def test_load_task_errors(tmp_path, content, match):
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(FileFormatError, match=match) as e:
        load_task(p)
    assert "\n" not in str(e.value) and str(p) in str(e.value)
    with pytest.raises(FileFormatError, match="does not exist"):
        load_task(tmp_path / "missing.json")


def test_load_task_defaults_name(tmp_path):
    p = tmp_path / "mini.json"
    p.write_text(json.dumps({"examples": TOY["examples"]}))
    assert load_task(p)["name"] == "mini"


def test_lm_eval_missing_is_one_line_error(monkeypatch, model, tok):
    from allocmoe.lm_eval_adapter import run_lm_eval

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` raise ImportError
    with pytest.raises(AllocMoeError, match=r"^lm-eval is not installed; pip install 'allocmoe\[lm-eval\]'$"):
        run_lm_eval(model, tok, ["x"])

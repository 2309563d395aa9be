"""Evaluation: perplexity / bits-per-byte on raw text, and zero-shot multiple-choice scoring of BIG-bench JSON tasks.

Both only call the model's plain forward, `model(input_ids=..., attention_mask=...).logits`, so they measure
whatever `allocmoe.apply` has patched into the model and assume nothing about routing.

Conventions shared by both:
- Text is tokenized with `add_special_tokens=False`; if the tokenizer defines a BOS token it is prepended (by hand)
  to every text / context. BOS is context only: it is never scored and counts zero bytes.
- Batches are right-padded with an attention mask; padded positions are never scored, so results do not depend on
  batch_size (up to float rounding).
- Everything runs under torch.no_grad() with the model in eval mode (its previous mode is restored afterwards).
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import DataError, FileFormatError, SettingsError
from .io import load_json

# -----------------------------------------------------------------------------
# shared helpers


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])  # no "too long" warning


def _bos(tokenizer) -> list[int]:
    return [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]


def _n_bytes(tokenizer, ids: list[int]) -> int:
    return len(tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False).encode("utf-8"))


@contextlib.contextmanager
def _eval_mode(model) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _score(model, seqs: list[list[int]], spans: list[tuple[int, int]], batch_size: int, pad_id: int,
           progress: bool, desc: str) -> list[float]:
    """Summed log-probability (nats) of seqs[i][a:b] given seqs[i][:a], for (a, b) = spans[i], a >= 1.

    The model reads seq[:-1] and predicts seq[1:]. Sequences are batched longest first (less padding);
    the result is in input order.
    """
    # offloaded weights (accelerate) sit on "meta" until their layer runs; accelerate's hooks move the inputs
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # stable, so deterministic
    out = [0.0] * len(seqs)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for idx in tqdm(batches, desc=desc, disable=not progress, leave=False):
        T = max(len(seqs[i]) for i in idx) - 1
        x = torch.full((len(idx), T), pad_id, dtype=torch.long)
        y = torch.full((len(idx), T), -100, dtype=torch.long)  # -100: not scored (context, padding)
        mask = torch.zeros((len(idx), T), dtype=torch.long)
        for r, i in enumerate(idx):
            s, (a, b) = seqs[i], spans[i]
            x[r, :len(s) - 1] = torch.tensor(s[:-1])
            mask[r, :len(s) - 1] = 1
            y[r, a - 1:b - 1] = torch.tensor(s[a:b])
        logits = model(input_ids=x.to(device), attention_mask=mask.to(device), use_cache=False).logits
        nll = F.cross_entropy(logits.float().transpose(1, 2), y.to(device), ignore_index=-100, reduction="none")
        for r, v in enumerate(nll.double().sum(1).tolist()):
            out[idx[r]] = -v
    return out


# -----------------------------------------------------------------------------
# perplexity


def _windows(n_targets: int, seq_len: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """Windows over a text of n_targets + 1 tokens: yields (begin, end, n_new).

    The model reads tokens[begin:end] (at most seq_len) and predicts tokens[begin+1:end+1]; only the last n_new
    of those predictions are scored, so every token but the first is scored exactly once, whatever the stride.
    """
    done, begin = 0, 0  # targets 1..done are scored
    while done < n_targets:
        end = min(begin + seq_len, n_targets)
        yield begin, end, end - done
        done, begin = end, begin + stride


def perplexity(model, tokenizer, texts: list[str] | str, seq_len: int = 256, stride: int | None = None,
               batch_size: int = 8, max_tokens: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Mean next-token NLL over `texts`, each tokenized and windowed on its own (texts are never joined).

    Windows: the model reads `seq_len` tokens at a time. A window starting at token `begin` reads
    tokens[begin:begin+seq_len] and predicts tokens[begin+1:begin+seq_len+1] (nanoGPT-style x/y), and windows start
    every `stride` tokens. stride == seq_len (default): non-overlapping windows, each token predicted from 1..seq_len
    tokens of context. stride < seq_len: HF's sliding window; after the first window only the last `stride`
    predictions are scored, so those tokens get at least seq_len - stride + 1 tokens of context. Either way every token
    of a text except its first is scored exactly once (with a BOS prepended, the first text token is scored too).
    A text's last window may be shorter (padded).

    bits_per_byte = total NLL in bits / UTF-8 bytes of the scored span, where the span of a text whose tokens
    ids[1:k] are scored counts len(decode(ids[:k])) - len(decode(ids[:1])) bytes (special tokens decode to
    nothing). With a BOS and no max_tokens cap this is the byte length of the whole text.

    max_tokens caps the number of scored tokens (texts are consumed in order). Texts with fewer than 2 tokens are
    skipped; if nothing is left to score, DataError.
    """
    if isinstance(texts, str):
        texts = [texts]
    stride = seq_len if stride is None else stride
    if seq_len < 1 or not 1 <= stride <= seq_len:
        raise SettingsError(f"need seq_len >= 1 and 1 <= stride <= seq_len, got seq_len={seq_len}, stride={stride}",
                            param="seq_len")
    if max_tokens is not None and max_tokens < 1:
        raise SettingsError(f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens")
    if not any(texts):
        raise DataError("evaluation text is empty")

    seqs, spans, n_bytes, longest = [], [], 0, 0
    budget = math.inf if max_tokens is None else max_tokens
    for text in texts:
        if budget <= 0:
            break
        ids = _bos(tokenizer) + _encode(tokenizer, text) if text else []
        longest = max(longest, len(ids))
        if len(ids) < 2:
            continue
        last = 0  # last scored target index of this text
        for begin, end, n_new in _windows(len(ids) - 1, seq_len, stride):
            if n_new > budget:  # max_tokens runs out inside this window: keep its first `budget` new targets
                end, n_new = end - (n_new - budget), budget
            seqs.append(ids[begin:end + 1])
            spans.append((len(seqs[-1]) - n_new, len(seqs[-1])))
            budget -= n_new
            last = end
            if budget <= 0:
                break
        n_bytes += _n_bytes(tokenizer, ids[:last + 1]) - _n_bytes(tokenizer, ids[:1])
    if not seqs:
        raise DataError(f"evaluation text is too short: need at least 2 tokens, the longest text has {longest}")

    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    with _eval_mode(model):
        logps = _score(model, seqs, spans, batch_size, pad_id, progress, "perplexity")
    n_tokens = sum(b - a for a, b in spans)
    nll_sum = -math.fsum(logps)
    nll = nll_sum / n_tokens
    return {
        "perplexity": math.exp(nll),
        "nll": nll,
        "bits_per_byte": nll_sum / math.log(2) / n_bytes if n_bytes else math.nan,
        "tokens": n_tokens,
        "bytes": n_bytes,
        "windows": len(seqs),
        "seq_len": seq_len,
        "stride": stride,
        # per scored window, in text order (the same windows for every plan on the same text): summed NLL in
        # nats and scored tokens, for paired comparisons (uncertainty.py)
        "window_nll": [-v for v in logps],
        "window_tokens": [b - a for a, b in spans],
    }


# -----------------------------------------------------------------------------
# multiple-choice tasks (BIG-bench JSON)


def load_task(path: str | os.PathLike) -> dict[str, Any]:
    """Load and validate a BIG-bench JSON multiple-choice task; "name" defaults to the file's stem.

    Format: {"name"?: str, "examples": [{"input": str, "target_scores": {choice: score, ...}}, ...]}.
    Other BIG-bench fields (canary, prefixes, ...) are kept but not used by score_task.
    """
    p = Path(path)
    task = load_json(p, "task file")
    if not isinstance(task, dict) or not isinstance(task.get("examples"), list):
        raise FileFormatError(f"task file {p} has no 'examples' list (expected BIG-bench JSON)")
    if not task["examples"]:
        raise FileFormatError(f"task file {p} has no examples")
    for i, ex in enumerate(task["examples"]):
        where = f"task file {p}, example {i}"
        if not isinstance(ex, dict) or not isinstance(ex.get("input"), str):
            raise FileFormatError(f"{where} has no string 'input'")
        ts = ex.get("target_scores")
        if not isinstance(ts, dict) or len(ts) < 2:
            raise FileFormatError(f"{where} needs 'target_scores' with at least 2 choices "
                                  "(generative tasks with only 'target' are not supported)")
        if "" in ts:
            raise FileFormatError(f"{where} has an empty choice")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in ts.values()):
            raise FileFormatError(f"{where} has a target score that is not a finite number")
    if not isinstance(task.setdefault("name", p.stem), str):
        raise FileFormatError(f"task file {p} has a 'name' that is not a string")
    return task


def _pair(tokenizer, context: str, choice: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation), as lm-eval's loglikelihood does for causal models.

    continuation = " " + choice, or just choice when the input is empty or ends with whitespace; trailing
    whitespace of the context is then moved to the front of the continuation (BPE tokenizers attach a space to the
    following word). The continuation's tokens are those of tokenize(context + continuation) after the first
    len(tokenize(context)) tokens. An empty context becomes the BOS token (or EOS when there is no BOS).
    """
    cont = choice if not context or context[-1].isspace() else " " + choice
    n = len(context) - len(context.rstrip())
    if n:
        context, cont = context[:-n], context[-n:] + cont
    if context:
        ctx_ids = _bos(tokenizer) + _encode(tokenizer, context)
        cont_ids = (_bos(tokenizer) + _encode(tokenizer, context + cont))[len(ctx_ids):]
    else:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if prefix is None:
            raise DataError("an example has an empty input, and the tokenizer has neither a BOS nor an EOS token")
        ctx_ids, cont_ids = [prefix], _encode(tokenizer, cont)
    if not cont_ids:
        raise DataError(f"choice {choice!r} tokenizes to nothing after its context")
    return ctx_ids, cont_ids


def score_task(model, tokenizer, task: dict[str, Any] | str | os.PathLike, batch_size: int = 16,
               max_examples: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Zero-shot multiple choice: score every choice by the summed log-likelihood of its tokens after the input.

    The correct answer is the choice with the highest target score (a tie counts any of them as correct).
    accuracy: argmax of the raw summed log-likelihood. accuracy_norm: argmax of log-likelihood / UTF-8 byte length of
    the choice text (without the joining space), which is lm-eval's acc_bytes, and its acc_norm for ASCII choices.
    chance: expected accuracy of a uniform random guess. BIG-bench prompt prefixes and few-shot are not used.
    Returns {"name", "n", "accuracy", "accuracy_norm", "chance", "details"}, one details entry per example:
    {"choices", "loglik", "pred", "pred_norm", "correct", "correct_norm"}.
    """
    if not isinstance(task, dict):
        task = load_task(task)
    examples = task["examples"][:max_examples]
    if not examples:
        raise DataError(f"task {task.get('name', '?')} has no examples to score")
    max_len = getattr(getattr(model, "config", None), "max_position_embeddings", None)

    seqs, spans = [], []
    for ex in examples:
        for choice in ex["target_scores"]:
            ctx, cont = _pair(tokenizer, ex["input"], choice)
            s = ctx + cont
            if max_len is not None and len(s) - 1 > max_len:
                s = s[-(max_len + 1):]  # drop context from the left, like lm-eval
            seqs.append(s)
            spans.append((len(s) - len(cont), len(s)))

    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    with _eval_mode(model):
        lls = _score(model, seqs, spans, batch_size, pad_id, progress, f"task {task.get('name', '')}")

    details, k = [], 0
    for ex in examples:
        choices, scores = list(ex["target_scores"]), list(ex["target_scores"].values())
        ll, k = lls[k:k + len(choices)], k + len(choices)
        norm = [v / len(c.encode("utf-8")) for v, c in zip(ll, choices)]
        pred = max(range(len(ll)), key=ll.__getitem__)  # first index on ties
        pred_norm = max(range(len(norm)), key=norm.__getitem__)
        best = max(scores)
        details.append({"choices": choices, "loglik": ll, "pred": pred, "pred_norm": pred_norm,
                        "correct": scores[pred] == best, "correct_norm": scores[pred_norm] == best})
    n = len(details)
    return {
        "name": task.get("name"),
        "n": n,
        "accuracy": sum(d["correct"] for d in details) / n,
        "accuracy_norm": sum(d["correct_norm"] for d in details) / n,
        "chance": sum(list(ex["target_scores"].values()).count(max(ex["target_scores"].values()))
                      / len(ex["target_scores"]) for ex in examples) / n,
        "details": details,
    }


# -----------------------------------------------------------------------------
# one configuration: a plan applied, perplexity with measured activations, task accuracies


def shipped_tasks() -> list[str]:
    """Paths of the BIG-bench task extracts that ship with allocmoe."""
    from .data import builtin_text

    d = builtin_text("validation").parent.parent / "tasks"
    return sorted(str(p) for p in d.glob("*.json"))


def evaluate(model, plan=None, *, tokenizer, texts: list[str] | str | None = None, tasks=(), seq_len: int = 256,
             batch_size: int = 8, max_tokens: int | None = None, max_examples: int | None = None,
             task_batch_size: int = 16, progress: bool = False) -> dict[str, Any]:
    """Perplexity (with the activations per token the patched model really executed) and task accuracies,
    with `plan` applied (None = the full model). `texts` default to the built-in validation split; `tasks`
    are task dicts or paths (`shipped_tasks()` for the shipped ones)."""
    from .data import read_texts
    from .patching import apply
    from .plan import full_plan

    if texts is None:
        texts, _ = read_texts(None, "validation")
    with apply(model, plan if plan is not None else full_plan(model)) as handle:
        ppl = perplexity(model, tokenizer, texts, seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens,
                         progress=progress)
        all_counts = handle.counts()
        counts = all_counts["cumulative"]
        res = {"perplexity": ppl["perplexity"], "nll": ppl["nll"], "bits_per_byte": ppl["bits_per_byte"],
               "tokens": ppl["tokens"], "window_nll": ppl["window_nll"], "window_tokens": ppl["window_tokens"],
               "activations_per_token": counts["activations_per_token"],
               "activations_per_token_per_layer": counts["activations_per_token_per_layer"], "tasks": {}}
        if "compensation" in all_counts:  # measured compensation work beside the expert activations
            res["compensation"] = all_counts["compensation"]
        for t in tasks:
            r = score_task(model, tokenizer, t, batch_size=task_batch_size, max_examples=max_examples,
                           progress=progress)
            res["tasks"][r["name"]] = {k: r[k] for k in ("accuracy", "accuracy_norm", "chance", "n")}
    return res


def above_chance(task: dict, z: float = 2.0) -> bool:
    """Whether a task result ({"accuracy", "chance", "n"}) is above chance beyond noise: accuracy more than `z`
    binomial standard errors of a random guesser above `chance`. A task the full model scores at chance
    cannot show what a budget costs."""
    n, c = int(task.get("n", 0)), float(task.get("chance", 0.0))
    if n < 1:
        return False
    return float(task["accuracy"]) > c + z * math.sqrt(c * (1 - c) / n)

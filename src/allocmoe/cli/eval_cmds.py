"""Quality commands: `allocmoe eval`, `allocmoe generate`, `allocmoe lm-eval`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..errors import AllocMoeError
from ..models import load_model
from .common import (
    DeviceMapOpt, ForceOpt, MaxMemoryOpt, ModelOpt, OffloadDirOpt, ParallelOpt, app, checked_out, err, load_kwargs,
    out, write_json_result,
)


@app.command("eval")
def eval_cmd(
    out_path: Path = typer.Option(..., "--out", "-o", help="eval JSON to write."),
    model: Optional[str] = ModelOpt,
    plan: Optional[Path] = typer.Option(None, "--plan", "-p", help="Plan JSON to apply (default: the full model)."),
    data: Optional[List[Path]] = typer.Option(None, "--data", help="Text file(s) for perplexity (default: built-in validation split)."),
    task: Optional[List[Path]] = typer.Option(None, "--task", help="BIG-bench-style JSON task(s) (default: the shipped tasks)."),
    seq_len: int = typer.Option(256, min=2, help="Window length in tokens (non-overlapping windows)."),
    max_tokens: Optional[int] = typer.Option(None, min=1, help="Cap on scored tokens for perplexity."),
    batch_size: int = typer.Option(8, min=1, help="Windows per forward pass."),
    max_examples: Optional[int] = typer.Option(None, min=1, help="Cap on examples per task."),
    dtype: str = typer.Option("float32", help="float32, bfloat16, float16 or auto."),
    force: bool = ForceOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemoryOpt,
    offload_dir: Optional[Path] = OffloadDirOpt,
    parallel: Optional[str] = ParallelOpt,
):
    """Perplexity, bits per byte and task accuracy, with a plan applied, and the activations that really ran."""
    from ..data import read_texts
    from ..evaluation import evaluate, load_task, shipped_tasks
    from ..plan import Plan

    target = checked_out(out_path, force, "eval output")
    p = Plan.load(plan) if plan else None
    m, tok, path = load_model(model, dtype, **load_kwargs(device_map, max_memory, offload_dir, parallel))
    texts, names = read_texts(data, "validation")
    tasks = [load_task(t) for t in (task or shipped_tasks())]
    err.print(f"evaluating {path}" + (f" with plan {plan}" if plan else " (full model)"))
    r = evaluate(m, p, tokenizer=tok, texts=texts, tasks=tasks, seq_len=seq_len, batch_size=batch_size,
                 max_tokens=max_tokens, max_examples=max_examples)
    r = dict(r, model=path, plan=str(plan) if plan else None, data=names, seq_len=seq_len)
    from ..distributed import is_main

    if is_main():  # under torchrun every rank evaluates the same text; rank 0 writes
        write_json_result(target, r)
    err.print(f"perplexity {r['perplexity']:.3f}, bits/byte {r['bits_per_byte']:.4f}, "
              f"activations/token {r['activations_per_token']:.3f}"
              + (f" + compensation {r['compensation']['macs_per_token']:,.0f} MACs/token "
                 f"(= {r['compensation']['expert_pair_equivalents_per_token']:.2f} expert activations)"
                 if "compensation" in r else "")
              + "".join(f", {n} acc {t['accuracy']:.3f}" for n, t in r["tasks"].items()))


@app.command()
def generate(
    prompt: str = typer.Option(..., "--prompt", help="Text to continue."),
    model: Optional[str] = ModelOpt,
    plan: Optional[Path] = typer.Option(None, "--plan", "-p", help="Plan JSON to apply (default: the full model)."),
    max_new_tokens: int = typer.Option(48, min=1, help="Tokens to generate."),
    sample: bool = typer.Option(False, "--sample", help="Sample (temperature 0.8, top-p 0.95) instead of greedy."),
    seed: int = typer.Option(0, help="Seed for sampling."),
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemoryOpt,
    offload_dir: Optional[Path] = OffloadDirOpt,
    parallel: Optional[str] = ParallelOpt,
):
    """Continue a prompt with a plan applied and print the text and the activations it used."""
    import torch

    from ..patching import apply
    from ..plan import Plan, full_plan

    m, tok, _ = load_model(model, **load_kwargs(device_map, max_memory, offload_dir, parallel))
    if tok is None:
        raise AllocMoeError("the model has no tokenizer")
    p = Plan.load(plan) if plan else full_plan(m)
    enc = tok(prompt, return_tensors="pt")
    if enc["input_ids"].numel() == 0:
        raise AllocMoeError("--prompt is empty")
    torch.manual_seed(seed)
    with apply(m, p) as h, torch.no_grad():
        outp = m.generate(**enc, max_new_tokens=max_new_tokens, do_sample=sample, temperature=0.8 if sample else None,
                          top_p=0.95 if sample else None, pad_token_id=tok.pad_token_id or tok.eos_token_id)
        c = h.counts()["cumulative"]
    from ..distributed import is_main

    if not is_main():  # under torchrun every rank generates the same text; rank 0 prints it
        return
    out.print(tok.decode(outp[0], skip_special_tokens=True), highlight=False, markup=False)
    err.print(f"activations/token {c['activations_per_token']:.2f} (measured over {c['tokens']} tokens; "
              f"full model: {sum(p.original_ks)}), per layer "
              + ", ".join(f"{a:.2f}" for a in c["activations_per_token_per_layer"]))


@app.command("lm-eval")
def lm_eval_cmd(
    tasks: str = typer.Option(..., "--tasks", help="Comma-separated lm-eval task names."),
    out_path: Path = typer.Option(..., "--out", "-o", help="JSON to write."),
    model: Optional[str] = ModelOpt,
    plan: Optional[Path] = typer.Option(None, "--plan", "-p", help="Plan JSON to apply."),
    include_path: Optional[Path] = typer.Option(None, help="Folder of local task YAMLs."),
    limit: Optional[float] = typer.Option(None, min=0, help="Examples per task (int) or fraction (< 1)."),
    batch_size: int = typer.Option(8, min=1, help="Batch size lm-eval uses."),
    num_fewshot: Optional[int] = typer.Option(None, min=0, help="Few-shot examples per prompt."),
    force: bool = ForceOpt,
):
    """Hand the patched model to lm-evaluation-harness (HFLM) and write its results."""
    from ..patching import apply
    from ..lm_eval_adapter import run_lm_eval
    from ..plan import Plan, full_plan

    if limit is not None and not 0 < limit < float("inf"):
        raise AllocMoeError(f"--limit must be a positive number, got {limit}")
    target = checked_out(out_path, force, "lm-eval output")
    m, tok, _ = load_model(model)
    p = Plan.load(plan) if plan else full_plan(m)
    lim = int(limit) if limit is not None and limit >= 1 else limit
    with apply(m, p) as h:
        r = run_lm_eval(m, tok, [t.strip() for t in tasks.split(",") if t.strip()],
                        include_path=str(include_path) if include_path else None, limit=lim,
                        batch_size=batch_size, num_fewshot=num_fewshot)
        r["allocmoe"] = {"plan": str(plan) if plan else None,
                         "activations_per_token": h.counts()["cumulative"]["activations_per_token"]}
    err.print(f"wrote {write_json_result(target, r)}")


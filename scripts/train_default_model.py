#!/usr/bin/env python
"""Train allocmoe's built-in default model: a tiny DeepSeek-V2 Mixture-of-Experts LM.

The model is a stock ``transformers`` ``DeepseekV2ForCausalLM`` (no remote code)
shaped like DeepSeek-V2-Lite in proportion: one dense first layer, then MoE
layers with many fine-grained routed experts (top-6 greedy routing, no top-k
renormalisation) plus a shared expert, and MLA attention.  It is trained on
the public-domain prose corpus produced by ``scripts/build_corpus.py``.

Routers are the testbed's crux.  Trained like the other weights, tiny MoE
routers either stay near uniform and change their choices as they learn (each
expert then sees arbitrary tokens and learns the same function, so any one of
the top-6 does the work of all six) or collapse onto one or two experts (the
rest carry no weight).  Either way halving the experts costs almost nothing.
The default recipe gives routers a small init and a slow learning rate
(x0.02): routing is a consistent function of the hidden state from step 0, so
experts specialise, and the top-6 weights stay flat, so the lower-ranked
experts matter; routed_scaling_factor 8 keeps the routed path O(1).

Steps (each is idempotent):

* ``tokenizer``: byte-level BPE (``tokenizers``) on ``corpus_build/train.txt``
  with ``<|endoftext|>`` as bos/eos/pad, saved as a standard HF tokenizer.
* ``train``: seeded, resumable training (``--resume``), AdamW + cosine,
  auxiliary load-balancing loss computed from the router logits captured with
  forward hooks on every ``mlp.gate``.  Saves a training checkpoint to
  ``corpus_build/train_ckpt/`` every few minutes; at the end writes the bf16
  safetensors checkpoint + tokenizer + ``TRAINING.md`` into
  ``src/allocmoe/assets/default_model/``.
  Shape flags (``--layers``, ``--experts``, ``--expert-width``, ``--shared``,
  ...), ``--train-file`` (e.g. the v2 corpus), ``--tokenizer`` (default: the
  built-in model's), ``--save-minutes N`` (atomically write a bf16 HF model
  dir to ``--out-dir`` every N minutes, with ``progress.json``) and
  ``--init-from DIR`` (warm restart from such a dir: fresh optimizer, lr
  schedule and data order continued at its step, short re-warmup).
* ``bench``: run training steps for N seconds and report throughput.
* ``eval``: perplexity at top-6 and uniform top-3 on all tokens of the shipped
  validation and out-of-domain splits, each MoE layer alone at top-3 on the
  first 32,768 validation tokens, plus three sample continuations -> ``--out`` (default
  ``corpus_build/default_model_eval.json``).

Example::

    .venv/bin/python scripts/train_default_model.py tokenizer
    .venv/bin/python scripts/train_default_model.py bench --seconds 60
    nohup .venv/bin/python scripts/train_default_model.py train --steps 4500 \\
        > corpus_build/train.log 2>&1 &       # the exact (staged) commands: TRAINING.md
    .venv/bin/python scripts/train_default_model.py eval
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "corpus_build"
OUT_DIR = REPO / "src" / "allocmoe" / "assets" / "default_model"
VAL_TXT = REPO / "src" / "allocmoe" / "assets" / "data" / "validation.txt"
OOD_TXT = REPO / "src" / "allocmoe" / "assets" / "data" / "ood.txt"
TOK_DIR = BUILD / "tokenizer"
CKPT_DIR = BUILD / "train_ckpt"
EOT = "<|endoftext|>"

PROMPTS = [
    "It is a truth universally acknowledged, that",
    "The Lord is my shepherd;",
    "In the morning she walked down to the village and",
]


# --------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------


def train_tokenizer(train_txt: Path, out_dir: Path, vocab_size: int = 8192):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tok.train([str(train_txt)], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        pad_token=EOT,
        unk_token=None,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def load_tokenizer(path: Path = TOK_DIR):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def encode_file(tok, path: Path, cache: Path | None = None) -> np.ndarray:
    """Token ids of a text file; chunks separated by blank lines get an EOT between."""
    if cache is not None and cache.exists():
        return np.load(cache)
    text = path.read_text(encoding="utf-8")
    docs = [d for d in text.split("\n\n") if d.strip()]
    eot = tok.convert_tokens_to_ids(EOT)
    ids: list[int] = []
    B = 256
    for i in range(0, len(docs), B):
        enc = tok(docs[i : i + B], add_special_tokens=False)["input_ids"]
        for e in enc:
            ids.extend(e)
            ids.append(eot)
    arr = np.asarray(ids, dtype=np.uint16)
    if cache is not None:
        np.save(cache, arr)
    return arr


# --------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------


def shared_config(vocab_size: int, eot_id: int) -> dict:
    """What both built-in models share: the tokenizer (<|endoftext|> as bos/eos/pad), the 1,024-token context,
    RoPE, RMSNorm, tied embeddings and the init scale."""
    return dict(vocab_size=vocab_size, bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id,
                max_position_embeddings=1024, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                rms_norm_eps=1e-6, tie_word_embeddings=True, initializer_range=0.02, use_cache=True)


def make_qwen3_moe_config(vocab_size: int, eot_id: int, **over):
    """The second built-in model (issue 20): a stock Qwen3-MoE -- every layer MoE, softmax top-8 of 64
    fine-grained experts with renormalised weights, no shared experts, grouped-query attention with
    QK-norm -- trained with the family's usual recipe (routers trained like every other weight, a
    load-balancing loss), not one tuned to flatten the routers."""
    from transformers import Qwen3MoeConfig

    kw = dict(
        hidden_size=256,
        intermediate_size=768,  # unused (no dense layers), kept for completeness
        moe_intermediate_size=48,
        num_hidden_layers=12,
        num_experts=64,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        router_aux_loss_coef=0.01,
        output_router_logits=False,
        **shared_config(vocab_size, eot_id),
    )
    kw.update(over)
    return Qwen3MoeConfig(**kw)


def n_experts(cfg) -> int:
    """Routed experts per MoE layer, whatever the family calls it."""
    return getattr(cfg, "n_routed_experts", None) or cfg.num_experts


def make_config(vocab_size: int, eot_id: int, family: str = "deepseek_v2", **over):
    if family == "qwen3_moe":
        return make_qwen3_moe_config(vocab_size, eot_id, **over)
    from transformers import DeepseekV2Config

    kw = dict(
        hidden_size=256,
        intermediate_size=768,  # dense first layer
        moe_intermediate_size=64,  # fine-grained experts
        num_hidden_layers=7,
        first_k_dense_replace=1,
        n_routed_experts=48,
        num_experts_per_tok=6,
        n_shared_experts=1,
        topk_method="greedy",
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        n_group=None,
        topk_group=None,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=None,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        **shared_config(vocab_size, eot_id),
    )
    kw.update(over)
    return DeepseekV2Config(**kw)


def moe_gates(model):
    """The router modules (``layer.mlp.gate``) of every MoE layer, by layer index."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and hasattr(gate, "top_k"):
            out[i] = gate
    return out


class RouterCapture:
    """Forward hooks on every ``mlp.gate`` that keep router logits + chosen experts."""

    def __init__(self, model):
        self.logits: dict[int, torch.Tensor] = {}
        self.indices: dict[int, torch.Tensor] = {}
        self.handles = []
        for i, gate in moe_gates(model).items():
            self.handles.append(gate.register_forward_hook(self._hook(i)))

    def _hook(self, i):
        def fn(module, inputs, output):
            logits, _weights, indices = output
            self.logits[i] = logits
            self.indices[i] = indices

        return fn

    def clear(self):
        self.logits.clear()
        self.indices.clear()

    def balance_loss(self, n_experts: int, top_k: int) -> torch.Tensor:
        """Switch/DeepSeek expert-level balance loss averaged over MoE layers:
        ``E * sum_i f_i * P_i`` with ``f_i`` the fraction of routed slots going
        to expert i and ``P_i`` its mean router probability (1.0 when uniform)."""
        losses = []
        for i, logits in self.logits.items():
            probs = logits.float().softmax(-1)
            counts = torch.zeros(n_experts, device=logits.device)
            counts.scatter_add_(0, self.indices[i].reshape(-1), torch.ones(self.indices[i].numel()))
            f = counts / self.indices[i].numel()
            losses.append(n_experts * (f * probs.mean(0)).sum())
        return torch.stack(losses).mean()

    def z_loss(self) -> torch.Tensor:
        """ST-MoE router z-loss: mean squared log-sum-exp of the router logits (keeps routers soft)."""
        return torch.stack([torch.logsumexp(lg.float(), -1).pow(2).mean() for lg in self.logits.values()]).mean()

    def usage(self, n_experts: int) -> dict[int, np.ndarray]:
        out = {}
        for i, idx in self.indices.items():
            out[i] = np.bincount(idx.reshape(-1).cpu().numpy(), minlength=n_experts)
        return out

    def remove(self):
        for h in self.handles:
            h.remove()


# --------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------


def batch_at(data: np.ndarray, step: int, batch: int, seq: int, seed: int) -> torch.Tensor:
    """Deterministic random windows for a given step (so resuming is exact)."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(data) - seq - 1, size=batch)
    x = np.stack([data[s : s + seq + 1] for s in starts]).astype(np.int64)
    return torch.from_numpy(x)


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def eval_loss(model, data: np.ndarray, seq: int, max_windows: int | None = None, batch: int = 8) -> float:
    """Mean next-token loss over consecutive non-overlapping windows of ``seq`` tokens."""
    model.eval()
    n = (len(data) - 1) // seq
    if max_windows is not None:
        n = min(n, max_windows)
    tot, cnt = 0.0, 0
    for b in range(0, n, batch):
        rows = [data[i * seq : i * seq + seq + 1] for i in range(b, min(n, b + batch))]
        x = torch.from_numpy(np.stack(rows).astype(np.int64))
        logits = model(input_ids=x[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
        )
        tot += loss.item()
        cnt += x[:, 1:].numel()
    model.train()
    return tot / cnt


def build_model(tok, seed: int, experts_impl: str | None = None, family: str = "deepseek_v2", **over):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = make_config(len(tok), tok.convert_tokens_to_ids(EOT), family, **over)
    model = AutoModelForCausalLM.from_config(cfg)
    if experts_impl:
        model.set_experts_implementation(experts_impl)
    return model


def save_ckpt(path: Path, model, opt, step: int, extra: dict):
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "ckpt.pt.tmp"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "extra": extra}, tmp)
    os.replace(tmp, path / "ckpt.pt")


def cmd_tokenizer(args):
    train_tokenizer(BUILD / "train.txt", TOK_DIR, args.vocab)
    print(f"tokenizer -> {TOK_DIR}")


def train_loop(args, bench_seconds: float | None = None):
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.tokenizer)
    train_file = args.train_file
    data = encode_file(tok, train_file, ids_cache(train_file, tok))
    val = encode_file(tok, VAL_TXT, ids_cache(VAL_TXT, tok))  # keyed by size+mtime: a new split, a new cache
    model = build_model(tok, args.seed, args.experts_impl, args.family, **shape_overrides(args))
    cfg = model.config
    with torch.no_grad():  # seeded router init; its std sets how flat the top-6 weights start (module docstring)
        g = torch.Generator().manual_seed(args.seed + 1)
        for gate in moe_gates(model).values():
            gate.weight.copy_(torch.randn(gate.weight.shape, generator=g) * args.router_init_std)
    warm_start = None
    if getattr(args, "init_from", None):
        load_weights_from(model, args.init_from)
        warm_start = args.start_step
        prog = Path(args.init_from) / "progress.json"
        if warm_start is None and prog.exists():
            warm_start = int(json.loads(prog.read_text())["step"])
        warm_start = warm_start or 0
        print(
            f"initialised weights from {args.init_from}; fresh optimizer; continuing the lr schedule and data "
            f"order at step {warm_start} with a {args.rewarmup}-step linear re-warmup",
            flush=True,
        )
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"params {n_params / 1e6:.2f}M  train tokens {len(data) / 1e6:.2f}M  val tokens {len(val) / 1e6:.3f}M",
        flush=True,
    )
    router = [p for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")]
    rest = [(n, p) for n, p in model.named_parameters() if not n.endswith("mlp.gate.weight")]
    decay = [p for n, p in rest if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in rest if not (p.ndim >= 2 and "norm" not in n)]
    # routers: no weight decay (it would pull them towards flat, unspecialised routing)
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.wd, "lr_mult": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0},
            {"params": router, "weight_decay": 0.0, "lr_mult": args.router_lr_mult},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    step0 = warm_start or 0
    elapsed0 = 0.0
    if getattr(args, "resume", False) and (args.ckpt_dir / "ckpt.pt").exists():
        ck = torch.load(args.ckpt_dir / "ckpt.pt", map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step0 = ck["step"]
        elapsed0 = ck["extra"].get("elapsed", 0.0)
        print(f"resumed from step {step0} ({elapsed0 / 60:.1f} min already)", flush=True)

    cap = RouterCapture(model)
    model.train()
    total = args.steps
    t_start = time.time()
    last_ckpt = time.time()
    last_save = time.time()
    ema = None
    usage_acc = None
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 else _null()

    def snapshot(steps_done: int):
        save_hf_snapshot(model, tok, args.out_dir, progress_state(args, steps_done, ema, elapsed0 + time.time() - t_start))

    pbar = tqdm(range(step0, total), initial=step0, total=total, mininterval=10, file=sys.stdout)
    step = step0
    for step in pbar:
        lr = lr_at(step, total, args.lr, args.warmup)
        if warm_start is not None and args.rewarmup > 0:  # fresh Adam moments: ramp up again
            lr *= min(1.0, (step - warm_start + 1) / args.rewarmup)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
        x = batch_at(data, step, args.batch, args.seq, args.seed)
        cap.clear()
        with autocast:
            logits = model(input_ids=x[:, :-1]).logits
        ce = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        bal = cap.balance_loss(n_experts(cfg), cfg.num_experts_per_tok)
        zl = cap.z_loss() if args.zloss > 0 else torch.zeros(())
        loss = ce + args.aux * bal + args.zloss * zl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = ce.item() if ema is None else 0.98 * ema + 0.02 * ce.item()
        u = cap.usage(n_experts(cfg))
        usage_acc = u if usage_acc is None else {k: usage_acc[k] + u[k] for k in u}
        pbar.set_postfix(loss=f"{ema:.3f}", bal=f"{bal.item():.3f}", z=f"{zl.item():.2f}", lr=f"{lr:.2e}", refresh=False)
        if bench_seconds is not None and time.time() - t_start > bench_seconds:
            break
        if (step + 1) % args.log_every == 0:
            worst = {k: f"{(v.max() / v.mean()):.2f}" for k, v in usage_acc.items()}
            usage_acc = None
            vl, vh = half_budget_probe(model, val, args.seq)
            el = elapsed0 + time.time() - t_start
            print(
                f"\nstep {step + 1}/{total} ce_ema {ema:.4f} bal {bal.item():.4f} val {vl:.4f} "
                f"half-K val ppl +{100 * (math.exp(vh - vl) - 1):.2f}% "
                f"elapsed {el / 60:.1f} min  max/mean expert load {worst}",
                flush=True,
            )
        if bench_seconds is None and time.time() - last_ckpt > args.ckpt_minutes * 60:
            save_ckpt(args.ckpt_dir, model, opt, step + 1, {"elapsed": elapsed0 + time.time() - t_start})
            last_ckpt = time.time()
        if bench_seconds is None and args.save_minutes and time.time() - last_save > args.save_minutes * 60:
            snapshot(step + 1)
            last_save = time.time()
        if bench_seconds is None and getattr(args, "stop_step", None) and step + 1 >= args.stop_step:
            save_ckpt(args.ckpt_dir, model, opt, step + 1, {"elapsed": elapsed0 + time.time() - t_start})
            if args.save_minutes:
                snapshot(step + 1)
            print(f"\nstopped at step {step + 1} (--stop-step); continue with --resume", flush=True)
            break
        if bench_seconds is None and args.max_minutes and elapsed0 + time.time() - t_start > args.max_minutes * 60:
            print(f"\nmax wall time reached at step {step + 1}; stopping early", flush=True)
            if args.save_minutes:
                save_ckpt(args.ckpt_dir, model, opt, step + 1, {"elapsed": elapsed0 + time.time() - t_start})
                snapshot(step + 1)
            break
    pbar.close()
    cap.remove()
    done = step + 1 - step0
    dt = time.time() - t_start
    tps = done * args.batch * args.seq / dt
    print(f"{done} steps in {dt:.1f}s: {dt / done:.3f} s/step, {tps:.0f} tokens/s", flush=True)
    return model, tok, data, val, step + 1, elapsed0 + dt, ema


def ids_cache(train_file: Path, tok) -> Path:
    """Token-id cache for a training text file: ``corpus_build/<stem>_ids_<size>_<mtime>_<vocab>.npy``
    (a rebuilt corpus gets a fresh cache)."""
    train_file = Path(train_file)
    st = train_file.stat()
    return BUILD / f"{train_file.stem}_ids_{st.st_size}_{int(st.st_mtime)}_{len(tok)}.npy"


def load_weights_from(model, src: Path):
    """Copy the weights of a saved HF model dir (any dtype; loaded with the stock Auto class, which
    converts the on-disk expert layout) into ``model``, which must have the same shape."""
    from transformers import AutoModelForCausalLM

    src_model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    for key in ("model_type", "num_hidden_layers", "n_routed_experts", "num_experts", "moe_intermediate_size",
                "n_shared_experts", "hidden_size", "intermediate_size", "vocab_size", "num_experts_per_tok"):
        a, b = getattr(src_model.config, key, None), getattr(model.config, key, None)
        if a != b:
            raise SystemExit(f"--init-from {src}: {key} is {a} there but {b} here (pass the same shape flags)")
    model.load_state_dict(src_model.state_dict(), strict=True)
    del src_model


def progress_state(args, steps_done: int, ema: float | None, elapsed_s: float) -> dict:
    """What a saved model dir's progress.json records (periodic snapshots and the final save alike)."""
    return {"step": steps_done, "tokens_seen": steps_done * args.batch * args.seq, "ce_ema": ema,
            "elapsed_minutes": elapsed_s / 60, "schedule_steps": args.steps,
            "command": " ".join(["python", "scripts/train_default_model.py"] + sys.argv[1:])}


def save_hf_snapshot(model, tok, out_dir: Path, state: dict):
    """Atomically write a bf16 HF model dir (config, model.safetensors, tokenizer, progress.json):
    written to ``<out_dir>.tmp`` and renamed over ``out_dir`` (the previous copy is removed after)."""
    import copy
    import shutil

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    old = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    m = copy.deepcopy(model).to(torch.bfloat16)
    m.config.use_cache = True
    m.config.dtype = torch.bfloat16
    m.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "progress.json").write_text(json.dumps(state, indent=2) + "\n")
    del m
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    print(f"\nsaved bf16 snapshot at step {state.get('step')} -> {out_dir}", flush=True)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def shape_overrides(args) -> dict:
    """Config overrides from the command line's shape flags (defaults: the family's config)."""
    if args.family == "qwen3_moe":
        over = dict(num_experts=args.experts, num_experts_per_tok=args.top_k, moe_intermediate_size=args.expert_width,
                    num_hidden_layers=args.layers)
        return {k: v for k, v in over.items() if v is not None}
    return dict(
        routed_scaling_factor=args.routed_scale,
        n_routed_experts=args.experts,
        num_experts_per_tok=args.top_k,
        moe_intermediate_size=args.expert_width,
        n_shared_experts=args.shared,
        intermediate_size=args.dense_width,
        num_hidden_layers=args.layers,
    )


@torch.no_grad()
def half_budget_probe(model, val: np.ndarray, seq: int, windows: int | None = 24) -> tuple[float, float]:
    """Validation loss at full top-K and with every MoE layer at top-ceil(K/2) (the stock router's
    ``top_k``), on the first ``windows`` windows (None: all): whether halving the experts costs."""
    k = model.config.num_experts_per_tok
    full = eval_loss(model, val, seq, max_windows=windows)
    set_topk(model, math.ceil(k / 2))
    half = eval_loss(model, val, seq, max_windows=windows)
    set_topk(model, k)
    return full, half


def cmd_bench(args):
    train_loop(args, bench_seconds=args.seconds)


def cmd_train(args):
    t0 = time.time()
    model, tok, data, val, steps_done, wall, ema = train_loop(args)
    if args.stop_step and steps_done >= args.stop_step and steps_done < args.steps:
        return  # a staged run: the training state is in --ckpt-dir, nothing to save yet
    torch.set_num_threads(args.threads)
    vl = eval_loss(model, val, args.seq)
    tl = eval_loss(model, data[: 256 * 257], args.seq)  # first 256 windows of train
    print(f"final: val loss {vl:.4f} (ppl {math.exp(vl):.2f}), train-slice loss {tl:.4f}", flush=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    model.config.use_cache = True
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(args.out_dir, safe_serialization=True)
    tok.save_pretrained(args.out_dir)
    tokens_seen = steps_done * args.batch * args.seq
    cmd = " ".join(["python", "scripts/train_default_model.py"] + sys.argv[1:])
    # the final state, like every snapshot's (the periodic snapshot's progress.json would be stale)
    (args.out_dir / "progress.json").write_text(json.dumps(progress_state(args, steps_done, ema, wall), indent=2) + "\n")
    n_params = sum(p.numel() for p in model.parameters())
    size = sum(f.stat().st_size for f in args.out_dir.glob("*.safetensors"))
    cfg = model.config
    if args.family == "qwen3_moe":
        table = f"""# allocmoe built-in Qwen3-MoE model -- training record

Tiny Qwen3-MoE language model (stock `transformers` `Qwen3MoeForCausalLM`, no remote code), trained from
scratch on the corpus in `src/allocmoe/assets/data/SOURCES.md` (v3: no GCIDE).

| | |
|---|---|
| layers | {cfg.num_hidden_layers} (all MoE) |
| hidden size | {cfg.hidden_size} |
| attention | GQA, {cfg.num_attention_heads} heads, {cfg.num_key_value_heads} KV heads, head dim {cfg.head_dim}, QK-norm |
| routed experts | {cfg.num_experts} x {cfg.moe_intermediate_size}, softmax top-{cfg.num_experts_per_tok}, norm_topk_prob={cfg.norm_topk_prob} |
| shared experts | none |
| vocab | {cfg.vocab_size} (the built-in DeepSeek-V2 model's tokenizer) |
| parameters | {n_params / 1e6:.2f} M (tied embeddings) |
| checkpoint | {size / 1e6:.1f} MB bf16 safetensors |

"""
    else:
        table = f"""# allocmoe default model -- training record

Tiny DeepSeek-V2 Mixture-of-Experts language model (stock `transformers`
`DeepseekV2ForCausalLM`, no remote code), trained from scratch on the
public-domain English prose corpus in `src/allocmoe/assets/data/SOURCES.md`.

| | |
|---|---|
| layers | {cfg.num_hidden_layers} ({cfg.first_k_dense_replace} dense + {cfg.num_hidden_layers - cfg.first_k_dense_replace} MoE) |
| hidden size | {cfg.hidden_size} |
| attention | MLA, {cfg.num_attention_heads} heads, q_lora_rank={cfg.q_lora_rank}, kv_lora_rank={cfg.kv_lora_rank}, qk_nope={cfg.qk_nope_head_dim}, qk_rope={cfg.qk_rope_head_dim}, v={cfg.v_head_dim} |
| dense FFN | {cfg.intermediate_size} |
| routed experts | {cfg.n_routed_experts} x {cfg.moe_intermediate_size}, top-{cfg.num_experts_per_tok} greedy, no renormalisation, routed_scaling_factor {cfg.routed_scaling_factor} |
| shared experts | {cfg.n_shared_experts} |
| vocab | {cfg.vocab_size} (byte-level BPE, `<|endoftext|>` = bos/eos/pad) |
| parameters | {n_params / 1e6:.2f} M (tied embeddings) |
| checkpoint | {size / 1e6:.1f} MB bf16 safetensors |

"""
    md = table + f"""## Training

* command: `{cmd}` (after `scripts/build_corpus.py` and `scripts/train_default_model.py tokenizer`)
* hardware: {args.threads} CPU thread(s) (`torch.set_num_threads({args.threads})`), {'bf16 autocast' if args.bf16 else 'fp32'}
* steps: {steps_done} x batch {args.batch} x seq {args.seq} = {tokens_seen / 1e6:.2f} M tokens seen
  (train split: {len(data) / 1e6:.2f} M tokens)
* optimiser: AdamW (betas 0.9/0.95, wd {args.wd}), peak lr {args.lr}, {args.warmup} warmup steps, cosine to 10 %
* auxiliary expert load-balancing loss coefficient: {args.aux}; router learning-rate multiplier {args.router_lr_mult}, router init std {args.router_init_std}, router z-loss {args.zloss}, no weight decay on routers
* seed: {args.seed}
* training wall time: {wall / 60:.1f} min (whole script {(time.time() - t0) / 60:.1f} min)
* final train loss (EMA of last steps): {ema:.4f}
* final loss on the first 256 train windows: {tl:.4f}
* final validation loss (all non-overlapping 256-token windows of validation.txt): {vl:.4f} (perplexity {math.exp(vl):.2f})
"""
    (args.out_dir / "TRAINING.md").write_text(md)
    (BUILD / "train_result.json").write_text(
        json.dumps(
            {
                "command": cmd,
                "wall_minutes": wall / 60,
                "steps": steps_done,
                "tokens_seen": tokens_seen,
                "final_train_ema": ema,
                "final_train_slice_loss": tl,
                "final_val_loss": vl,
                "params": n_params,
                "checkpoint_bytes": size,
            },
            indent=2,
        )
    )
    print(f"saved -> {args.out_dir}", flush=True)


# --------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------


def set_topk(model, k: int | dict[int, int]):
    for i, gate in moe_gates(model).items():
        gate.top_k = k[i] if isinstance(k, dict) else k


def routed_diagnostics(model, ids: np.ndarray, seq: int, base: float) -> dict:
    """Why halving costs what it costs: perplexity with every MoE layer at top-k for k = 0..K (k = 0: routed
    experts' output replaced by zeros, the shared experts still run), and each MoE layer's routed output
    norm relative to its shared experts' output norm (RMS over tokens, full top-K)."""
    gates = moe_gates(model)
    K = model.config.num_experts_per_tok
    curve = {K: base}  # full top-K: the reference, measured by the caller on the same tokens
    for k in range(0, K):
        hooks = []
        if k == 0:
            hooks = [model.model.layers[i].mlp.experts.register_forward_hook(lambda mod, a, out: torch.zeros_like(out))
                     for i in gates]
        set_topk(model, max(k, 1))
        try:
            curve[k] = math.exp(eval_loss(model, ids, seq))
        finally:
            for h in hooks:
                h.remove()
        print(f"every MoE layer at top-{k}: ppl {curve[k]:.3f} ({100 * (curve[k] / base - 1):+.2f}%)", flush=True)
    set_topk(model, K)
    curve = dict(sorted(curve.items()))
    sq = {i: {"routed": 0.0, "shared": 0.0} for i in gates}

    def grab(i, part):
        def hook(mod, args, out):
            sq[i][part] += float(out.float().pow(2).sum())
        return hook

    hooks = [model.model.layers[i].mlp.experts.register_forward_hook(grab(i, "routed")) for i in gates]
    hooks += [model.model.layers[i].mlp.shared_experts.register_forward_hook(grab(i, "shared")) for i in gates
              if getattr(model.model.layers[i].mlp, "shared_experts", None) is not None]
    try:
        eval_loss(model, ids, seq, max_windows=16)
    finally:
        for h in hooks:
            h.remove()
    ratio = {str(i): math.sqrt(v["routed"] / v["shared"]) for i, v in sq.items() if v["shared"] > 0}
    print("routed / shared output RMS per MoE layer: " + ", ".join(f"{r:.2f}" for r in ratio.values()), flush=True)
    return {"tokens": int(len(ids)), "uniform_topk_ppl": {str(k): v for k, v in curve.items()},
            "uniform_topk_rel_increase": {str(k): v / base - 1 for k, v in curve.items()},
            "routed_over_shared_rms": ratio}


def cmd_eval(args):
    """The model's budget sensitivity, on all tokens of the shipped validation and out-of-domain splits:
    full top-K vs uniform top-ceil(K/2) on both, and each MoE layer alone at top-ceil(K/2) on validation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    k_full = model.config.num_experts_per_tok
    half = math.ceil(k_full / 2)
    res: dict = {"model": str(args.model), "seq": args.seq, "threads": args.threads}
    val = None
    for split, path in (("validation", VAL_TXT), ("ood", OOD_TXT)):
        ids = encode_file(tok, path)[: args.max_tokens]
        t0 = time.time()
        base, uni = (math.exp(x) for x in half_budget_probe(model, ids, args.seq, windows=None))
        res[split] = {"file": str(path.relative_to(REPO)), "tokens": int(len(ids)),
                      "per_layer_tokens": args.per_layer_tokens if split == "validation" else None,
                      "windows": (len(ids) - 1) // args.seq, f"top{k_full}_ppl": base,
                      f"uniform_top{half}_ppl": uni, f"uniform_top{half}_rel_increase": uni / base - 1}
        print(f"{split}: {len(ids):,} tokens, top-{k_full} ppl {base:.3f}, uniform top-{half} ppl {uni:.3f} "
              f"({100 * (uni / base - 1):+.2f}%)  ({time.time() - t0:.0f}s for both)", flush=True)
        if split == "validation":  # the per-layer reference: full top-K on the same prefix
            val = ids
            val_base = math.exp(eval_loss(model, val[: args.per_layer_tokens + 1], args.seq))
    per = {}
    for i in moe_gates(model):
        set_topk(model, {j: (half if j == i else k_full) for j in moe_gates(model)})
        p = math.exp(eval_loss(model, val[: args.per_layer_tokens + 1], args.seq))
        per[str(i)] = {"ppl": p, "rel_increase": p / val_base - 1}
        print(f"layer {i} alone top-{half}: ppl {p:.3f}  ({100 * (p / val_base - 1):+.2f}%)", flush=True)
    set_topk(model, k_full)
    inc = [v["rel_increase"] for v in per.values()]
    res[f"single_layer_top{half}"] = per
    res["single_layer_spread"] = {"min": min(inc), "max": max(inc), "max_over_min": max(inc) / min(inc)
                                  if min(inc) > 0 else None}
    print(f"single-layer spread: {100 * min(inc):+.2f}% .. {100 * max(inc):+.2f}%", flush=True)
    res["diagnostics"] = routed_diagnostics(model, val[: args.per_layer_tokens + 1], args.seq, val_base)

    gens = []
    for prompt in PROMPTS:
        torch.manual_seed(0)
        ids = tok(prompt, return_tensors="pt")
        out = model.generate(
            **ids,
            max_new_tokens=40,
            do_sample=True,
            temperature=0.8,
            top_p=0.9,
            pad_token_id=tok.pad_token_id,
        )
        text = tok.decode(out[0], skip_special_tokens=True)
        gens.append({"prompt": prompt, "text": text, "sampling": "seed 0, temperature 0.8, top_p 0.9"})
        print(repr(text), flush=True)
    res["continuations"] = gens
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"-> {args.out}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tokenizer")
    t.add_argument("--vocab", type=int, default=8192)
    for name in ("train", "bench"):
        p = sub.add_parser(name)
        p.add_argument("--steps", type=int, default=3000)
        p.add_argument("--batch", type=int, default=16)
        p.add_argument("--seq", type=int, default=256)
        p.add_argument("--lr", type=float, default=2e-3)
        p.add_argument("--wd", type=float, default=0.1)
        p.add_argument("--warmup", type=int, default=100)
        p.add_argument("--aux", type=float, default=0.01)
        p.add_argument("--router-lr-mult", type=float, default=0.02, help="learning-rate multiplier for routers")
        p.add_argument("--router-init-std", type=float, default=0.02, help="std of the router weight init")
        p.add_argument("--zloss", type=float, default=0.0, help="router z-loss coefficient")
        p.add_argument(
            "--routed-scale",
            type=float,
            default=8.0,
            help="routed_scaling_factor (DeepSeek-V2 uses 16, V2-Lite 1): top-6 softmax weights over 48 "
            "experts sum to well below 1, this keeps the routed path O(1)",
        )
        p.add_argument("--family", choices=["deepseek_v2", "qwen3_moe"], default="deepseek_v2",
                       help="model family: deepseek_v2 (the built-in default model) or qwen3_moe (builtin:qwen3-moe)")
        p.add_argument("--experts", type=int, default=None, help="routed experts per MoE layer (deepseek_v2: 48)")
        p.add_argument("--top-k", type=int, default=None, help="experts per token (deepseek_v2: 6)")
        p.add_argument("--expert-width", type=int, default=None, help="moe_intermediate_size (deepseek_v2: 64)")
        p.add_argument("--shared", type=int, default=1, help="shared experts")
        p.add_argument("--dense-width", type=int, default=768, help="intermediate_size of the dense first layer")
        p.add_argument("--layers", type=int, default=None, help="num_hidden_layers (deepseek_v2: 7, the first dense)")
        p.add_argument("--tokenizer", type=Path, default=None,
                       help="tokenizer dir (default: corpus_build/tokenizer if present, else the built-in model's)")
        p.add_argument("--train-file", type=Path, default=BUILD / "train.txt", help="training text")
        p.add_argument("--init-from", type=Path, default=None,
                       help="warm restart: copy weights from this saved HF model dir, fresh optimizer and schedule")
        p.add_argument("--start-step", type=int, default=None,
                       help="with --init-from: step to continue the lr schedule / data order at "
                       "(default: 'step' in the dir's progress.json, else 0)")
        p.add_argument("--rewarmup", type=int, default=100, help="with --init-from: linear lr re-warmup steps")
        p.add_argument("--save-minutes", type=float, default=0.0,
                       help="every N minutes atomically write a bf16 HF model dir to --out-dir (0: only at the end)")
        p.add_argument("--out-dir", type=Path, default=OUT_DIR, help="where the checkpoint is saved")
        p.add_argument("--ckpt-dir", type=Path, default=CKPT_DIR, help="resumable training state")
        p.add_argument("--seed", type=int, default=1234)
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--bf16", action="store_true", help="bf16 autocast")
        p.add_argument("--experts-impl", default=None, help="eager | batched_mm | grouped_mm")
        p.add_argument("--log-every", type=int, default=200)
        p.add_argument("--ckpt-minutes", type=float, default=5.0)
        p.add_argument("--max-minutes", type=float, default=None)
        p.add_argument("--resume", action="store_true")
        p.add_argument("--stop-step", type=int, default=None,
                       help="stop after this step, keeping the resumable state (for staged runs)")
        if name == "bench":
            p.add_argument("--seconds", type=float, default=60)
    e = sub.add_parser("eval")
    e.add_argument("--seq", type=int, default=256)
    e.add_argument("--model", type=Path, default=OUT_DIR)
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--out", type=Path, default=BUILD / "default_model_eval.json")
    e.add_argument("--max-tokens", type=int, default=None, help="cap on each split's tokens (default: all)")
    e.add_argument("--per-layer-tokens", type=int, default=32768,
                   help="validation tokens (a prefix; the split is interleaved across sources) for each layer alone")
    args = ap.parse_args(argv)
    if getattr(args, "family", None) == "deepseek_v2":  # the historical defaults of the DeepSeek-V2 recipe
        for name, default in (("experts", 48), ("top_k", 6), ("expert_width", 64), ("layers", 7)):
            if getattr(args, name) is None:
                setattr(args, name, default)
    if getattr(args, "tokenizer", "x") is None:
        args.tokenizer = TOK_DIR if (TOK_DIR / "tokenizer.json").exists() else OUT_DIR
    {"tokenizer": cmd_tokenizer, "train": cmd_train, "bench": cmd_bench, "eval": cmd_eval}[args.cmd](args)


if __name__ == "__main__":
    main()

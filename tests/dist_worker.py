"""Worker for tests/test_distributed.py, launched with `torchrun --nproc-per-node 2` (gloo, CPU).

    torchrun --nproc-per-node 2 tests/dist_worker.py MODE OUT MODEL_DIR [MODEL_DIR ...]

MODE is `ep` (DistributedConfig(ep_size=2, fsdp_size=2)), `tp` (DistributedConfig(tp_size=2, tp_plan="auto"))
or `all` (both, one after the other).
For every model it loads the sharded model, runs the stock forward and every plan of `plans_for` on the same
inputs, and rank 0 saves logits and counts to OUT/<mode>-<model name>.pt for the test to compare with one
process. It also records, per rank, how many (token, expert) rows this rank's experts computed (EP) and the
one-line error of a plan made for another model.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch


def inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(3, 100, (3, 12), generator=g)
    x[2, :4] = 0  # left padding in the last row
    return x, (x != 0).long()


def plans_for(model):
    import allocmoe

    L = len(allocmoe.find_moe_layers(model))
    ks = [2] * L
    return {
        "full": allocmoe.full_plan(model),
        "fixed": allocmoe.make_plan(model, [1] + [3] * (L - 1)),
        "global": allocmoe.make_plan(model, ks, token_policy="global"),
        "threshold": allocmoe.make_plan(model, ks, token_policy="threshold", layer_params=[{"threshold": 0.1}] * L),
        "top-p": allocmoe.make_plan(model, ks, token_policy={"name": "top-p", "p": 0.6}),
        "naee": allocmoe.make_plan(model, ks, token_policy={"name": "naee", "beta": 0.3}),
        "global-renorm": allocmoe.make_plan(model, ks, token_policy="global", renormalize="renorm"),
    }


def run_plans(model, record_rows=None) -> dict:
    import allocmoe

    x, mask = inputs()
    res = {}
    with torch.no_grad():
        res["stock"] = {"logits": model(x, attention_mask=mask).logits.detach().clone()}
        for name, plan in plans_for(model).items():
            if record_rows is not None:
                record_rows.clear()
            with allocmoe.apply(model, plan) as h:
                logits = model(x, attention_mask=mask).logits.detach().clone()
                c = h.counts()
                load = h.expert_load()
            res[name] = {"logits": logits, "counts": c, "expert_load": load,
                         "rows": sum(record_rows) if record_rows is not None else None}
        # no padding, full-K plan: every call takes the stock (sharded) experts forward
        res["nopad"] = {"stock": model(x.clamp(min=3)).logits.detach().clone()}
        with allocmoe.apply(model, allocmoe.full_plan(model)):
            res["nopad"]["full"] = model(x.clamp(min=3)).logits.detach().clone()
    return res


def main() -> None:
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface, grouped_mm_experts_forward

    import allocmoe
    import allocmoe.testing

    torch.set_num_threads(1)
    mode, out = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()

    rows: list[int] = []

    def counting(self, hidden_states, top_k_index, top_k_weights):
        # the rows this rank's experts compute (sentinels = other ranks' experts are skipped by grouped_mm)
        rows.append(int((top_k_index < self.num_experts).sum()))
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)

    if "counting" not in ALL_EXPERTS_FUNCTIONS:
        ExpertsInterface.register("counting", counting)

    jobs = [(m, d) for m in (("ep", "tp") if mode == "all" else (mode,)) for d in sys.argv[3:]]
    for mode, model_dir in jobs:
        cfg = (DistributedConfig(ep_size=2, fsdp_size=2) if mode == "ep"
               else DistributedConfig(tp_size=2, tp_plan="auto"))
        model = AutoModelForCausalLM.from_pretrained(model_dir, distributed_config=cfg).eval()
        if mode == "ep":
            model.config._experts_implementation = "counting"
        res = run_plans(model, rows if mode == "ep" else None)
        res["rows_per_rank"] = {n: None for n in res if n not in ("stock", "nopad")}
        for n in list(res["rows_per_rank"]):
            box = [None] * dist.get_world_size()
            dist.all_gather_object(box, res[n]["rows"])
            res["rows_per_rank"][n] = box
        # a plan made for another model (the tiny model with 4 experts per layer) is refused in one line
        other = allocmoe.testing.tiny_model(model.config.model_type, num_experts=4, top_k=2)
        try:
            allocmoe.apply(model, allocmoe.full_plan(other))
            res["mismatch_error"] = None
        except allocmoe.AllocMoeError as e:
            res["mismatch_error"] = str(e)
        res["local_experts"] = int(allocmoe.find_moe_layers(model)[0].experts.num_experts)
        res["num_experts"] = int(allocmoe.find_moe_layers(model)[0].num_experts)
        if rank == 0:
            torch.save(res, out / f"{mode}-{Path(model_dir).name}.pt")
        del model
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

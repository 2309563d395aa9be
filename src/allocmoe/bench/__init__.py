"""Speed: prefill and decode timings of the full model and of plans, measured in one process, interleaved.

    from allocmoe.bench import BenchSettings, run_bench, format_table
    result = run_bench(model, {"half": plan, "half-global": plan2}, BenchSettings(repeats=5))
    print(format_table(result))   # every ratio beside its Amdahl limit; unreliable ones marked ⚠

Modules, one concern each:
- environment: the record of where it ran (versions, threads, load average, dtype, experts implementation);
- workloads: the prefill / decode phases, the timer, and the routed-expert share probe;
- stats: summaries, ratios, the Amdahl limit, token-policy overhead, the reliability flags (pure);
- runner: `BenchSettings`, `run_bench`, `amdahl`, the default configs;
- tables: markdown tables.
The command line (`allocmoe bench`) lives in allocmoe.cli (job_cmds.py).
"""

from .environment import environment, load_average, machine_busy, set_experts_implementation
from .runner import (BENCH_FORMAT, BENCH_VERSION, FULL, BenchSettings, Variant, amdahl, default_plans, load_plans,
                     run_bench)
from .stats import (LIMIT_TOLERANCE, MAX_SPREAD, flag_ratios, ideal_speedup, iqr_over_median, policy_overhead,
                    ratio_flags)
from .tables import MARK, format_table, marked_ratio
from .workloads import Phase, make_phases, measure_expert_share

__all__ = [
    "BenchSettings", "run_bench", "amdahl", "Variant", "default_plans", "load_plans", "FULL", "BENCH_FORMAT",
    "BENCH_VERSION", "environment", "load_average", "machine_busy", "set_experts_implementation", "Phase",
    "make_phases", "measure_expert_share", "ideal_speedup", "iqr_over_median", "ratio_flags", "flag_ratios",
    "policy_overhead", "LIMIT_TOLERANCE", "MAX_SPREAD", "format_table", "marked_ratio", "MARK",
]

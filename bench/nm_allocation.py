"""N:M under a sparsity budget ("2:4@40%"): which linears take the pattern, which stay dense.

    python bench/nm_allocation.py --budget 0.4 --method sparsegpt --threads 1
    python bench/nm_allocation.py --model gemma3-270m --budget 0.4

Every arm prunes the same dense model (restored between arms) with the same calibration and evaluation text
(the benches' Python-docs protocol, bench/llm_sparsity.py: pydocs_blocks) and the same method, and differs only in
which layers take the N:M pattern. All layer choices reach the same parameter-weighted budget (a floor, met by
whole layers):
  measured  what `prunepilot sparsify --sparsity 2:4@40%` runs (sparsify/plan.py nm_layer_choice with the probe):
            each layer's cost is the probe's KL to the dense model with only that layer under its Wanda N:M mask
            (held-out calibration text, --probe-seqs x --probe-seqlen), cheapest per weight removed first
  wanda_err the same greedy rule on an unmeasured proxy: the relative Wanda error of the layer's N:M mask
  depth     the deepest blocks take the pattern first, the first blocks stay dense (a common rule of thumb:
            early layers are the most sensitive)
  random    a seeded random order (three seeds, mean and range)
and two references: N:M on every layer (the pattern's own sparsity, more than the budget) and unstructured at the
budget, uniform. Perplexity on held-out text and KL to the dense model on the same tokens.
Writes bench/results/nm_allocation[_MODEL].json.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_sparsity import pydocs_blocks  # noqa: E402  (the shared protocol)

from prunepilot.engines import sparsity as sp  # noqa: E402
from prunepilot.evaluate.language import dense_reference, fidelity, mean_nll  # noqa: E402
from prunepilot.results import environment, write_json_atomic  # noqa: E402
from prunepilot.sources.llm import load_causal_lm  # noqa: E402
from prunepilot.sparsify.calibrate import activation_norms, linear_layers, modules_by_name, sequential_sparsify  # noqa: E402
from prunepilot.sparsify.loop import Probe  # noqa: E402
from prunepilot.sparsify.plan import nm_layer_choice, project  # noqa: E402


def take_in_order(infos: list, order: list[str], nm: sp.NM, target: float) -> dict[str, int]:
    """Layers in this order take the pattern until the pruned weights reach the budget (the same floor rule)."""
    by = {i.name: i for i in infos}
    need = target * sum(i.params for i in infos)
    counts: dict[str, int] = {}
    for name in order:
        if sum(counts.values()) >= need - 0.5:
            break
        counts[name] = int(round(nm.sparsity * by[name].params))
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--budget", type=float, default=0.4)
    ap.add_argument("--method", default="sparsegpt", choices=["wanda", "sparsegpt"])
    ap.add_argument("--calib-seqs", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-seqs", type=int, default=4)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--probe-seqs", type=int, default=4)
    ap.add_argument("--probe-seqlen", type=int, default=256)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    nm = sp.parse_nm(args.pattern)
    assert nm is not None, "--pattern is N:M, e.g. 2:4"
    out = Path(args.out or f"bench/results/nm_allocation{'' if args.model == 'smollm2' else '_' + args.model}.json")

    lm = load_causal_lm(args.model)
    model, tok = lm.model, lm.tokenizer
    _, calib, probe_ids, evalb = pydocs_blocks(tok, args)
    infos = linear_layers(model)
    mods = modules_by_name(model, infos)
    dense_w = {n: m.weight.detach().clone() for n, m in mods.items()}
    total = sum(i.params for i in infos)
    t0 = time.perf_counter()
    dense_ppl = math.exp(mean_nll(model, evalb, 4))
    ref = dense_reference(model, evalb)
    norms = activation_norms(model, calib, 4)
    print(f"dense ppl {dense_ppl:.2f} ({time.perf_counter() - t0:.0f}s)", flush=True)

    t0 = time.perf_counter()
    probe = Probe(model, probe_ids, 4)

    def measure(name: str, keep: torch.Tensor) -> float:  # as sparsify/run.py measures it
        w = mods[name].weight
        with torch.no_grad():
            w.mul_(keep.to(w.dtype))
            kl = probe.measure(model).kl
            w.copy_(dense_w[name])
        return max(kl - probe.dense.kl, 0.0)

    measured, _ = nm_layer_choice(infos, {n: m.weight for n, m in mods.items()}, norms, nm, args.budget, measure=measure)
    measure_s = time.perf_counter() - t0
    proxy, _ = nm_layer_choice(infos, {n: m.weight for n, m in mods.items()}, norms, nm, args.budget)
    blocks = sorted({i.block for i in infos})
    deep_first = [i.name for b in reversed(blocks) for i in infos if i.block == b]
    arms: list[tuple[str, dict[str, int], sp.NM | None]] = [
        ("measured", measured, nm), ("wanda_err", proxy, nm),
        ("depth", take_in_order(infos, deep_first, nm, args.budget), nm)]
    for seed in range(args.seeds):
        order = [i.name for i in infos]
        random.Random(seed).shuffle(order)
        arms.append((f"random{seed}", take_in_order(infos, order, nm, args.budget), nm))
    arms += [(f"{nm} everywhere", {i.name: int(round(nm.sparsity * i.params)) for i in infos}, nm),
             (f"unstructured {args.budget:.0%} uniform", project({}, infos, args.budget), None)]

    rows: list[dict[str, Any]] = []
    for name, counts, pattern in arms:
        with torch.no_grad():
            for n, m in mods.items():
                m.weight.copy_(dense_w[n])
        t0 = time.perf_counter()
        achieved = sequential_sparsify(model, calib, counts, args.method, pattern, 4)
        ppl = math.exp(mean_nll(model, evalb, 4))
        fid = fidelity(model, ref)
        sparsity = sum(achieved.get(i.name, 0.0) * i.params for i in infos) / total
        row = {"arm": name, "perplexity": round(ppl, 3), "kl": round(fid["kl"], 4), "sparsity": round(sparsity, 4),
               "nm_layers": len(counts) if pattern else 0, "dense_layers": len(infos) - len(counts) if pattern else 0,
               "seconds": round(time.perf_counter() - t0, 1)}
        if name in ("measured", "wanda_err", "depth"):
            kinds: dict[str, int] = {}
            for i in infos:
                if i.name not in counts:
                    kinds[i.name.rsplit(".", 1)[-1]] = kinds.get(i.name.rsplit(".", 1)[-1], 0) + 1
            row["dense_by_kind"] = kinds
        rows.append(row)
        print(row, flush=True)
        rand = [r["perplexity"] for r in rows if r["arm"].startswith("random")]
        write_json_atomic(out, {
            "environment": environment(), "model": args.model, "pattern": str(nm), "budget": args.budget,
            "method": args.method, "dense_perplexity": round(dense_ppl, 3),
            "protocol": {"calib": f"{args.calib_seqs}x{args.seqlen} pydocs", "eval": f"{args.eval_seqs}x{args.eval_seqlen} "
                         "held-out pydocs", "kl": "KL(dense || sparse) per token on the evaluation tokens"},
            "measure_s": round(measure_s, 1), "probe": f"{args.probe_seqs}x{args.probe_seqlen}",
            "rows": rows, "random_mean": round(sum(rand) / len(rand), 3) if rand else None,
            "random_range": [min(rand), max(rand)] if rand else None,
            "command": "python bench/nm_allocation.py " + " ".join(sys.argv[1:])})
    ref.close()


if __name__ == "__main__":
    main()

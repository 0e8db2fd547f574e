"""How LLM sparsification cost grows with model size: wall time and peak RSS per size, against the memory goal.

    python bench/llm_scaling.py                       # random Llama-style models ~135M..~3B, wanda + sparsegpt
    python bench/llm_scaling.py --sizes 135m,360m --methods wanda
    python bench/llm_scaling.py --smollm2 --tag after  # SmolLM2-135M, `prunepilot sparsify` as a user runs it

Scaling mode: each size is a transformers LlamaConfig with random weights, saved once in bf16 safetensors under
--models-dir and loaded through `hf:DIR` (its checkpoint dtype, bf16). Every (size, method) runs
`prunepilot sparsify hf:DIR --agent uniform --sparsity 50%` in its own subprocess with small calibration
(--calib-seqs x --seqlen tokens of the offline pydocs text) and a short evaluation, so each peak RSS is that run's
own (os.wait4's ru_maxrss). The goal line is 1.3 x the bf16 weights + the calibration activations
(n_seqs x seqlen x hidden x 4 bytes x 2: float32 block inputs and outputs) + the baseline: the run's own RSS after
its imports and tokenizer, right before its weights are read (result.json memory.rss_before_weights_mb). The peak RSS
of a separate process doing the CLI's imports (+ the tokenizer) is recorded too (baselines_rss_mb).
Each run's result.json also gives the peak after every phase (`peak_rss_after_phase_mb`): where the peak was set.
Writes bench/results/llm_scaling.json and llm_scaling.png.

SmolLM2 mode: `prunepilot sparsify smollm2 --sparsity 50%` with --agent uniform (defaults otherwise) and with the
built-in loop (sensitivity: profile, gradient scores, Wanda bank, cost probes, ramp, refine), each in a subprocess;
writes bench/results/llm_scaling_smollm2_<tag>.json. Run with PYTHONPATH pointing at an older checkout's src to
measure "before".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

# name -> (hidden, intermediate, layers, heads, kv_heads); vocab 49152 (SmolLM2's), untied lm_head
SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "135m": (576, 1536, 30, 9, 3),
    "360m": (960, 2560, 32, 15, 5),
    "0.8b": (1536, 4096, 24, 16, 8),
    "1.7b": (2048, 8192, 24, 32, 32),
    "3b": (3072, 8192, 28, 24, 8),
}
VOCAB = 49152


def _config(name: str) -> Any:
    from transformers import LlamaConfig

    d, ff, n, h, kv = SIZES[name]
    return LlamaConfig(vocab_size=VOCAB, hidden_size=d, intermediate_size=ff, num_hidden_layers=n,
                       num_attention_heads=h, num_key_value_heads=kv, max_position_embeddings=2048,
                       tie_word_embeddings=name == "135m", torch_dtype="bfloat16")


def make_model(name: str, root: Path) -> Path:
    """Random-weight Llama of this size in bf16 safetensors (built once; built layer-free on the meta device
    first would need accelerate hooks, so it is simply built in bf16: 2 bytes per parameter while saving)."""
    target = root / f"llama-{name}"
    if (target / "config.json").is_file():
        return target
    code = f"""
import sys, torch
from transformers import AutoTokenizer, LlamaForCausalLM
sys.path.insert(0, {str(ROOT / 'bench')!r})
from llm_scaling import _config
torch.manual_seed(0)
torch.set_default_dtype(torch.bfloat16)
cfg = _config({name!r})
model = LlamaForCausalLM(cfg).to(torch.bfloat16)
with torch.no_grad():  # Llama's init (std 0.02) is fine for random weights; keep norms at one
    pass
model.save_pretrained({str(target)!r})
"""
    tmp = target.with_name(target.name + ".part")
    code = code.replace(repr(str(target)), repr(str(tmp)))
    subprocess.run([sys.executable, "-c", code], check=True)
    _copy_tokenizer(tmp)
    os.replace(tmp, target)
    return target


def _copy_tokenizer(target: Path) -> None:
    """SmolLM2's tokenizer (vocab 49152) from the GGUF float cache, so pydocs text tokenizes as for SmolLM2."""
    code = """
import sys
from prunepilot.sources.llm import load_causal_lm
from prunepilot.sources.gguf import cached_model_dir
from transformers import AutoTokenizer
d = cached_model_dir('smollm2')
if not d.is_dir():
    load_causal_lm('smollm2')
AutoTokenizer.from_pretrained(str(d)).save_pretrained(sys.argv[1])
"""
    subprocess.run([sys.executable, "-c", code, str(target)], check=True)


def baseline_rss_mb(model_dir: Path | None = None) -> dict[str, float]:
    """Peak RSS of processes that load no weights: `imports` = python -m prunepilot.cli's imports plus the
    sparsify path (torch, transformers, the Llama modelling code); `with_tokenizer` = those plus the model's
    tokenizer (SmolLM2's, ~0.2 GB for a 49k vocabulary here), i.e. everything a run holds besides weights and
    activations. The ratio to the weights is taken over `with_tokenizer`."""
    code = ("import sys, torch, transformers, prunepilot.cli, prunepilot.sparsify.run, "
            "transformers.models.llama.modeling_llama\n"
            "if len(sys.argv) > 1: transformers.AutoTokenizer.from_pretrained(sys.argv[1])")
    out = {"imports": run_measured([sys.executable, "-c", code])["peak_rss_mb"]}
    if model_dir is not None:
        out["with_tokenizer"] = run_measured([sys.executable, "-c", code, str(model_dir)])["peak_rss_mb"]
    return out


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one command; its wall time and its own peak RSS (ru_maxrss from wait4)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": proc.returncode, "wall_s": round(time.perf_counter() - t0, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "tail": out[-1500:]}


def _params(name: str) -> dict[str, int]:
    d, ff, n, h, kv = SIZES[name]
    hd = d // h
    block = d * (h * hd) * 2 + d * (kv * hd) * 2 + 3 * d * ff
    emb = VOCAB * d
    lm_head = 0 if name == "135m" else VOCAB * d
    return {"total": n * block + emb + lm_head + (2 * n + 1) * d, "prunable": n * block, "hidden": d, "layers": n}


def scaling(args: argparse.Namespace) -> None:
    root = Path(args.models_dir)
    root.mkdir(parents=True, exist_ok=True)
    out_json = RESULTS / "llm_scaling.json"
    prior = json.loads(out_json.read_text()) if out_json.is_file() and args.keep else {}
    first = make_model(args.sizes.split(",")[0], root)
    baselines = baseline_rss_mb(first)  # every size shares SmolLM2's tokenizer
    base = baselines["with_tokenizer"]
    todo = {(z, m) for z in args.sizes.split(",") for m in args.methods.split(",")}
    rows: list[dict[str, Any]] = [r for r in prior.get("runs", []) if (r["size"], r["method"]) not in todo]
    for name in args.sizes.split(","):
        path = make_model(name, root)
        weights_mb = sum(p.stat().st_size for p in path.glob("*.safetensors")) / 2**20
        p = _params(name)
        # block inputs + outputs, float32 (blocks run upcast on a CPU without bf16 units)
        act_mb = 2 * args.calib_seqs * args.seqlen * p["hidden"] * 4 / 2**20
        for method in args.methods.split(","):
            with tempfile.TemporaryDirectory(prefix="scaling-") as tmp:
                cmd = [sys.executable, "-m", "prunepilot.cli", "sparsify", f"hf:{path}", "--sparsity", "50%",
                       "--agent", "uniform", "--method", method, "--calib-seqs", str(args.calib_seqs),
                       "--seqlen", str(args.seqlen), "--eval-seqs", "1", "--eval-seqlen", "128",
                       "--out", f"{tmp}/run", *(["--no-export"] if not args.export else [])]
                r = run_measured(cmd)
                res = json.loads((Path(tmp) / "run" / "result.json").read_text()) if r["rc"] == 0 else {}
            goal = 1.3 * weights_mb + act_mb
            mem = res.get("memory", {})
            own = mem.get("rss_before_weights_mb")  # the run itself, imports + tokenizer done, no weight read yet
            b = own if own else base
            row = {"size": name, "method": method, "params": p["total"], "prunable": p["prunable"],
                   "weights_mb": round(weights_mb, 1), "calib_act_mb": round(act_mb, 1), "rc": r["rc"],
                   "wall_s": r["wall_s"], "peak_rss_mb": r["peak_rss_mb"],
                   "baseline_mb": b, "baseline_from": "the run's RSS before its weights" if own else "baseline process",
                   "peak_minus_baseline_mb": round(r["peak_rss_mb"] - b, 1),
                   "goal_mb": round(goal, 1), "goal_plus_baseline_mb": round(goal + b, 1),
                   "ratio_to_weights": round((r["peak_rss_mb"] - b) / weights_mb, 3),
                   "ratio_to_weights_vs_baseline_process": round((r["peak_rss_mb"] - base) / weights_mb, 3),
                   "meets_goal": r["peak_rss_mb"] - b <= goal,
                   "timings_s": res.get("timings_s"), "perplexity": res.get("compressed", {}).get("perplexity"),
                   "sparsity": res.get("compressed", {}).get("sparsity"),
                   "peak_rss_after_phase_mb": res.get("memory", {}).get("peak_rss_after_phase_mb"),
                   "export": {k: res["export"].get(k) for k in ("size_mb", "identical", "verified")} if res.get("export") else None,
                   "command": " ".join(["prunepilot", *cmd[3:]]).replace(tmp, "TMP")}
            if r["rc"] != 0:
                row["error"] = r["tail"]
            print(json.dumps({k: v for k, v in row.items() if k not in ("timings_s", "peak_rss_after_phase_mb")}), flush=True)
            rows.append(row)
            _write(out_json, baselines, args, rows, todo)
    _plot(rows, base, RESULTS / "llm_scaling.png")


def _write(path: Path, baselines: dict[str, float], args: argparse.Namespace, rows: list[dict[str, Any]],
           todo: set[tuple[str, str]]) -> None:
    from prunepilot.results import environment, write_json_atomic

    if args.keep and path.is_file():  # rows another invocation (other sizes, run alongside) wrote meanwhile win
        # over this invocation's copy from its start; only the (size, method) pairs it measures are its own
        rows = ([r for r in json.loads(path.read_text()).get("runs", []) if (r["size"], r["method"]) not in todo]
                + [r for r in rows if (r["size"], r["method"]) in todo])

    write_json_atomic(path, {"environment": environment(), "baseline_rss_mb": baselines["with_tokenizer"],
                             "baselines_rss_mb": baselines,
                             "protocol": {"sparsity": "50% unstructured, uniform", "calib": f"{args.calib_seqs}x{args.seqlen} pydocs",
                                          "eval": "1x128", "dtype": "bfloat16 (checkpoint)", "export": args.export,
                                          "goal": "peak RSS - baseline <= 1.3 x weights + calibration activations",
                                          "baseline": "per run: its own RSS after imports and tokenizer, before any weight is read "
                                                      "(result.json memory.rss_before_weights_mb); also the peak RSS of a "
                                                      "separate process doing the CLI's imports (+ tokenizer): baselines_rss_mb"},
                             "runs": rows})


def _plot(rows: list[dict[str, Any]], base: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method, mark in (("wanda", "o"), ("sparsegpt", "s")):
        rs = sorted((r for r in rows if r["method"] == method and r["rc"] == 0), key=lambda r: r["params"])
        if not rs:
            continue
        x = [r["params"] / 1e9 for r in rs]
        a1.plot(x, [r["peak_rss_mb"] / 1024 for r in rs], marker=mark, label=f"{method} peak RSS")
        a2.plot(x, [r["wall_s"] for r in rs], marker=mark, label=method)
    rs = sorted({r["size"]: r for r in rows}.values(), key=lambda r: r["params"])
    x = [r["params"] / 1e9 for r in rs]
    a1.plot(x, [r["goal_plus_baseline_mb"] / 1024 for r in rs], "k--", label="goal: 1.3x weights + act + baseline")
    a1.plot(x, [r["weights_mb"] / 1024 for r in rs], "k:", label="bf16 weights")
    a1.set(xlabel="parameters (B)", ylabel="GB", title="peak RSS (CPU)")
    a2.set(xlabel="parameters (B)", ylabel="s", title="wall time, whole run (CPU, 2 cores)")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


SMOLLM2_ARMS = {
    "uniform": ["--agent", "uniform"],  # every other setting at its default (32x512 calibration, 16x1024 eval)
    "loop_light": ["--agent", "sensitivity", "--bands", "1", "--refine-iters", "1", "--calib-seqs", "8",
                   "--seqlen", "256", "--eval-seqs", "4", "--probe-seqs", "2", "--probe-seqlen", "128"],
}


def smollm2(args: argparse.Namespace) -> None:
    path = RESULTS / f"llm_scaling_smollm2_{args.tag}.json"
    prior = json.loads(path.read_text()) if path.is_file() else {}
    rows = prior.get("arms", {})
    base = baseline_rss_mb()["imports"]
    for arm in args.arms.split(","):
        extra = SMOLLM2_ARMS[arm]
        with tempfile.TemporaryDirectory(prefix="smollm2-") as tmp:
            cmd = [sys.executable, "-m", "prunepilot.cli", "sparsify", "smollm2", "--sparsity", "50%", *extra,
                   "--out", f"{tmp}/run", *(["--no-export"] if not args.export else [])]
            r = run_measured(cmd)
            res = json.loads((Path(tmp) / "run" / "result.json").read_text()) if r["rc"] == 0 else {}
        rows[arm] = {"command": " ".join(["prunepilot", *cmd[3:-2]]), **{k: r[k] for k in ("rc", "wall_s", "peak_rss_mb")},
                     "timings_s": res.get("timings_s"), "perplexity": res.get("compressed", {}).get("perplexity"),
                     "dense_perplexity": res.get("dense", {}).get("perplexity"), "export": res.get("export")}
        if r["rc"] != 0:
            rows[arm]["error"] = r["tail"]
        print(arm, json.dumps(rows[arm]), flush=True)
        from prunepilot.results import environment, write_json_atomic

        import prunepilot

        write_json_atomic(path, {"environment": environment(), "source": str(Path(prunepilot.__file__).parent),
                                 "baseline_rss_mb": base, "model_fp32_mb": 538.1, "arms": rows})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="135m,360m,0.8b,1.7b,3b")
    ap.add_argument("--methods", default="wanda,sparsegpt")
    ap.add_argument("--calib-seqs", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--models-dir", default=str(Path(tempfile.gettempdir()) / "prunepilot-scaling-models"))
    ap.add_argument("--export", action="store_true", help="also export (save + verify) each sparse model")
    ap.add_argument("--keep", action="store_true", help="keep earlier rows of other sizes in the JSON")
    ap.add_argument("--smollm2", action="store_true")
    ap.add_argument("--tag", default="after")
    ap.add_argument("--arms", default="uniform,loop_light", help=f"SmolLM2 arms: {', '.join(SMOLLM2_ARMS)}")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    smollm2(args) if args.smollm2 else scaling(args)


if __name__ == "__main__":
    main()

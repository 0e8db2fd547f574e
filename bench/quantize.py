"""Benchmark: dynamic int8 quantization on CPU, every backend side by side in one process.

Part 1 (ProfilingAgent's setting): DeiT-B/16 and ViT-B/16 (timm, random weights), batch 1 at 224x224.
Variants: fp32 eager, eager dynamic int8 (torch.ao quantize_dynamic), torchao int8 dynamic in eager and
under torch.compile (with fp32 compiled as its fair baseline), ONNX Runtime fp32 and ORT dynamic int8.
All variants are timed interleaved (A B C ... A B C) with fixed threads, so ratios are comparable.
Size = serialized state_dict bytes (packed int8 included) or ONNX file size.

Part 2 (accuracy delta): a small ViT trained on Fashion-MNIST (cached after the first run), evaluated on
the full 10k test set in fp32 and after each int8 path.

    python bench/quantize.py                # full run, writes bench/results/quantize.json
    python bench/quantize.py --quick        # skip torch.compile variants (saves ~2-3 min)
"""

from __future__ import annotations

import argparse
import copy
import gzip
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prunepilot.engines.onnx_export import export_onnx, ort_session, quantize_onnx_int8, verify_onnx
from prunepilot.engines.quantize import quantize_
from prunepilot.evaluate.memory import MB, memory_report, state_dict_bytes
from prunepilot.evaluate.speed import compare_latency
from prunepilot.results import environment, write_json_atomic
from prunepilot.sources.models import load_model

warnings.filterwarnings("ignore")
OUT = Path(__file__).parent / "results" / "quantize.json"
FMNIST = Path("/usr/share/datasets/fashion-mnist")
CACHE = Path.home() / ".cache" / "prunepilot" / "bench"


def log(*a: Any) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def _ort_fn(path: Path, x: torch.Tensor) -> Callable[[], Any]:
    sess = ort_session(path, threads=torch.get_num_threads())
    feed = {sess.get_inputs()[0].name: x.numpy()}
    return lambda: sess.run(None, feed)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0))


def bench_model(uri: str, *, rounds: int, compile_: bool, tmp: Path) -> dict[str, Any]:
    log("model", uri)
    loaded = load_model(uri, weights="random")
    fp32, x = loaded.module.eval(), torch.randn(1, 3, 224, 224)
    fns: dict[str, Callable[[], Any]] = {}
    sizes: dict[str, float] = {}
    outs: dict[str, torch.Tensor] = {}
    notes: dict[str, str] = {}
    with torch.inference_mode():
        ref = fp32(x)

    def add(name: str, fn: Callable[[], Any], size_bytes: int) -> None:
        with torch.inference_mode():
            out = fn()
        outs[name] = torch.as_tensor(out[0]) if isinstance(out, list) else out
        fns[name], sizes[name] = fn, size_bytes / MB

    add("fp32_eager", lambda: fp32(x), state_dict_bytes(fp32))
    q = copy.deepcopy(fp32)
    rep = quantize_(q, {"*": "int8_dynamic"}, backend="eager")
    notes["eager_int8"] = rep.summary()
    add("eager_int8", lambda: q(x), rep.size_after_bytes)
    mem = {"fp32_eager": memory_report(fp32, x).to_json(), "eager_int8": memory_report(q, x).to_json()}

    try:
        ta = copy.deepcopy(fp32)
        rep_ao = quantize_(ta, {"*": "int8_dynamic"}, backend="torchao")
        notes["torchao"] = rep_ao.summary()
        # torchao without compile is several times slower than fp32: timed apart (2 rounds) so its multi-second
        # calls do not stretch the interleaved session of the others
        with torch.inference_mode():
            out_ao = ta(x)
        slow = compare_latency({"fp32_eager": fp32, "torchao_int8_eager": ta}, x, warmup=1, rounds=2)
        torchao_eager = {"latency_ms": round(slow["torchao_int8_eager"].median_ms, 2),
                         "fp32_eager_same_session_ms": round(slow["fp32_eager"].median_ms, 2),
                         "speedup_vs_fp32_eager": round(slow["fp32_eager"].median_ms / slow["torchao_int8_eager"].median_ms, 3),
                         "size_mb": round(rep_ao.size_after_bytes / MB, 2), "cosine_vs_fp32": round(_cos(out_ao, ref), 5)}
        if compile_:
            t0 = time.perf_counter()
            ca = torch.compile(ta)
            with torch.inference_mode():
                ca(x)
            notes["torchao_compile_s"] = f"{time.perf_counter() - t0:.1f}"
            add("torchao_int8_compiled", lambda: ca(x), rep_ao.size_after_bytes)
            t0 = time.perf_counter()
            cf = torch.compile(copy.deepcopy(fp32))
            with torch.inference_mode():
                cf(x)
            notes["fp32_compile_s"] = f"{time.perf_counter() - t0:.1f}"
            add("fp32_compiled", lambda: cf(x), state_dict_bytes(fp32))
    except Exception as exc:  # torchao missing or broken: record why, keep the rest of the bench
        notes["torchao_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"

    exp = export_onnx(fp32, x, tmp / f"{uri.split(':')[1]}.onnx")
    notes["onnx_exporter"] = exp.exporter + (f" (fallback: {exp.fallback_reason})" if exp.fallback_reason else "")
    add("onnx_fp32", _ort_fn(exp.path, x), exp.size_bytes)
    int8_path = tmp / f"{uri.split(':')[1]}.int8.onnx"
    int8_bytes = quantize_onnx_int8(exp.path, int8_path)
    add("onnx_int8", _ort_fn(int8_path, x), int8_bytes)

    log("timing", list(fns), f"rounds={rounds}")
    lat = compare_latency(fns, None, warmup=1, rounds=rounds)
    base = lat["fp32_eager"].median_ms
    onnx_base = lat["onnx_fp32"].median_ms
    variants = {}
    for name in fns:
        variants[name] = {
            "size_mb": round(sizes[name], 2),
            "size_reduction": round(1 - sizes[name] / sizes["fp32_eager"], 4),
            "latency_ms": round(lat[name].median_ms, 2),
            "p90_ms": round(lat[name].p90_ms, 2),
            "speedup_vs_fp32_eager": round(base / lat[name].median_ms, 3),
            "speedup_vs_onnx_fp32": round(onnx_base / lat[name].median_ms, 3),
            "cosine_vs_fp32": round(_cos(outs[name], ref), 5),
        }
    if "fp32_compiled" in lat and "torchao_int8_compiled" in lat:
        variants["torchao_int8_compiled"]["speedup_vs_fp32_compiled"] = round(
            lat["fp32_compiled"].median_ms / lat["torchao_int8_compiled"].median_ms, 3)
    log(uri, {k: (v["latency_ms"], v["size_mb"]) for k, v in variants.items()})
    if "torchao" in notes:
        variants["torchao_int8_eager"] = torchao_eager
    return {"uri": uri, "input_shape": list(x.shape), "rounds": rounds, "variants": variants, "memory": mem,
            "notes": notes}


# ----------------------------------------------------------------------------- Fashion-MNIST accuracy


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    def load(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        imgs = _idx(FMNIST / f"{split}-images-idx3-ubyte.gz")
        labels = _idx(FMNIST / f"{split}-labels-idx1-ubyte.gz")
        x = (torch.from_numpy(imgs.copy()).float().div(255) - 0.2860) / 0.3530  # (N, 28, 28)
        return x.unsqueeze(1), torch.from_numpy(labels.copy()).long()  # (N, 1, 28, 28), (N,)

    return (*load("train"), *load("t10k"))


def small_vit() -> nn.Module:
    import timm

    # 16 tokens of 7x7 patches, width 96, 4 blocks: Linear layers carry ~all the compute, as in DeiT
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=7, in_chans=1,
                             num_classes=10, embed_dim=96, depth=4, num_heads=3, mlp_ratio=4.0)


def trained_vit(xtr: torch.Tensor, ytr: torch.Tensor, epochs: int) -> tuple[nn.Module, dict[str, Any]]:
    path = CACHE / f"fmnist_vit96_e{epochs}.pt"
    model = small_vit()
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval(), {"cached": str(path)}
    torch.manual_seed(0)
    bs = 256
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    steps = epochs * (len(xtr) // bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    t0 = time.perf_counter()
    model.train()
    for ep in range(epochs):
        perm = torch.randperm(len(xtr))
        for i in range(len(xtr) // bs):
            idx = perm[i * bs:(i + 1) * bs]
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        log(f"fmnist vit epoch {ep + 1}/{epochs} loss {loss.item():.3f}")
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval(), {"trained_s": round(time.perf_counter() - t0, 1), "epochs": epochs}


@torch.inference_mode()
def accuracy(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    correct = 0
    for i in range(0, len(x), 500):
        correct += int((fn(x[i:i + 500]).argmax(1) == y[i:i + 500]).sum())
    return correct / len(x)


def bench_accuracy(model: nn.Module, train_info: dict[str, Any], xte: torch.Tensor, yte: torch.Tensor,
                   tmp: Path) -> dict[str, Any]:
    res: dict[str, Any] = {"model": "ViT (28x28, patch 7, dim 96, depth 4) on Fashion-MNIST", "train": train_info,
                           "test_samples": len(xte)}
    acc = {"fp32": accuracy(model, xte, yte)}
    sizes = {"fp32": state_dict_bytes(model) / MB}
    q = copy.deepcopy(model)
    rep = quantize_(q, {"*": "int8_dynamic"})
    acc["eager_int8"], sizes["eager_int8"] = accuracy(q, xte, yte), rep.size_after_bytes / MB
    try:
        ta = copy.deepcopy(model)
        rep_ao = quantize_(ta, {"*": "int8_dynamic"}, backend="torchao")
        acc["torchao_int8"], sizes["torchao_int8"] = accuracy(ta, xte, yte), rep_ao.size_after_bytes / MB
    except Exception as exc:
        res["torchao_error"] = str(exc)[:200]
    exp = export_onnx(model, xte[:2], tmp / "fmnist_vit.onnx")
    int8_path = tmp / "fmnist_vit.int8.onnx"
    sizes["onnx_int8"] = quantize_onnx_int8(exp.path, int8_path) / MB
    sess = ort_session(int8_path)
    name = sess.get_inputs()[0].name
    acc["onnx_int8"] = accuracy(lambda b: torch.from_numpy(sess.run(None, {name: b.numpy()})[0]), xte, yte)
    ver = verify_onnx(int8_path, model, [xte[:500]], min_cosine=0.98, min_top1=0.9)
    res["onnx_int8_verify"] = ver.to_json()
    res["accuracy"] = {k: round(v, 4) for k, v in acc.items()}
    res["delta_pt"] = {k: round(100 * (v - acc["fp32"]), 2) for k, v in acc.items() if k != "fp32"}
    res["size_mb"] = {k: round(v, 3) for k, v in sizes.items()}
    log("fmnist accuracy", res["accuracy"], "delta pt", res["delta_pt"])
    return res


# ------------------------------------------------------------------------- joint prune + quantize


def bench_joint(dense: nn.Module, xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, yte: torch.Tensor,
                *, steps: int) -> dict[str, Any]:
    """Same weight-memory budget, three ways: int8 only, pruning only, pruning + int8 (each pruned point gets
    the same short fine-tune). The pruning amount is found by the measured-budget projector, which brackets
    the budget with real serialized sizes."""
    from torch.utils.data import DataLoader, TensorDataset

    from prunepilot.budget import Band, Budget
    from prunepilot.engines.recover import finetune
    from prunepilot.evaluate.measured_budget import bracket_measured_target
    from prunepilot.pipeline import Pruner
    from prunepilot.plan import Plan
    from prunepilot.sources.models import LoadedModel

    x1 = xte[:1]
    pruner = Pruner(LoadedModel(dense, x1, "fmnist-vit", "trained small ViT"))
    dense_mb = state_dict_bytes(dense) / MB
    loader = DataLoader(TensorDataset(xtr, ytr), batch_size=256, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    band = Band(over=0.0, under=0.05)  # a hard cap: never above the budget

    def pruned(s: float) -> nn.Module:
        keep = max(0.05, 1.0 - s)
        rb = Budget.parse(params=f"{100 * keep:.3f}%").resolve(pruner.profile.dense)
        return pruner.candidate(Plan(), rb).model

    def int8(m: nn.Module) -> nn.Module:
        q = copy.deepcopy(m)
        quantize_(q, {"*": "int8_dynamic"}, measure_size=False)
        return q

    def size_mb(m: nn.Module) -> float:
        return state_dict_bytes(m) / MB

    def recovered(m: nn.Module) -> tuple[nn.Module, float]:
        t0 = time.perf_counter()
        finetune(m, loader, steps=steps, optimizer="adamw", lr=5e-4, weight_decay=0.05, progress=False)
        return m.eval(), time.perf_counter() - t0

    acc_dense = accuracy(dense, xte, yte)
    q_only = int8(dense)
    points: dict[str, Any] = {}
    for frac in (0.30, 0.20):
        goal = frac * dense_mb
        row: dict[str, Any] = {"budget_size_mb": round(goal, 4), "budget_fraction": frac}
        qs = size_mb(q_only)
        row["quantize_only"] = {"size_mb": round(qs, 4), "feasible": qs <= goal,
                                "accuracy": round(accuracy(q_only, xte, yte), 4)}
        # pruning only: bracket the pruning amount s on the real size
        t0 = time.perf_counter()
        br = bracket_measured_target(pruned, size_mb, goal, band=band, lo=0.0, hi=0.95, noise=0.0, max_measurements=10)
        if br.best_candidate is not None:
            m, ft_s = recovered(br.best_candidate)
            row["prune_only"] = {"size_mb": round(size_mb(m), 4), "params_removed": round(br.best.knob, 4),
                                 "accuracy": round(accuracy(m, xte, yte), 4), "feasible": True,
                                 "projector": {"n_measurements": br.n_measurements, "stop": br.stop_reason},
                                 "search_s": round(time.perf_counter() - t0 - ft_s, 1), "finetune_s": round(ft_s, 1)}
        # joint: the same bracketing, with int8 applied to every candidate before measuring
        t0 = time.perf_counter()
        pairs: dict[float, nn.Module] = {}

        def joint(s: float) -> nn.Module:
            pairs[s] = pruned(s) if s > 0 else copy.deepcopy(dense)
            return int8(pairs[s])

        bj = bracket_measured_target(joint, size_mb, goal, band=band, lo=0.0, hi=0.95, noise=0.0, max_measurements=10)
        if bj.best is not None:
            s = bj.best.knob
            if s > 0:  # fine-tune the pruned float model, then quantize it (PTQ after recovery)
                m, ft_s = recovered(pairs[s])
                qm = int8(m)
            else:
                qm, ft_s = bj.best_candidate, 0.0
            row["joint"] = {"size_mb": round(size_mb(qm), 4), "params_removed": round(s, 4),
                            "accuracy": round(accuracy(qm, xte, yte), 4), "feasible": size_mb(qm) <= goal,
                            "projector": {"n_measurements": bj.n_measurements, "stop": bj.stop_reason},
                            "search_s": round(time.perf_counter() - t0 - ft_s, 1), "finetune_s": round(ft_s, 1)}
        feas = {k: v["accuracy"] for k, v in row.items() if isinstance(v, dict) and v.get("feasible")}
        row["best_feasible"] = max(feas, key=feas.get) if feas else None
        log(f"joint @ {frac:.0%} of dense size:", {k: (v.get("size_mb"), v.get("accuracy"), v.get("feasible"))
                                                   for k, v in row.items() if isinstance(v, dict)})
        points[f"{int(frac * 100)}%"] = row
    return {"dense_size_mb": round(dense_mb, 4), "dense_accuracy": round(acc_dense, 4), "finetune_steps": steps,
            "finetune_batch": 256, "metric": "size_mb (serialized weights, packed int8 included)", "points": points}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="skip the torch.compile variants")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per variant")
    ap.add_argument("--models", default="timm:deit_base_patch16_224,timm:vit_base_patch16_224")
    ap.add_argument("--epochs", type=int, default=1, help="Fashion-MNIST ViT training epochs (cached)")
    ap.add_argument("--ft-steps", type=int, default=150, help="fine-tuning steps per pruned point (joint part)")
    ap.add_argument("--no-joint", action="store_true", help="skip the joint prune+quantize part")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    result: dict[str, Any] = {"bench": "quantize", "environment": environment(), "models": [],
                              "anchors": {"profilingagent": {"memory_reduction": 0.74, "cpu_speedup_vs_onnx": 1.74},
                                          "probe_here": {"memory_reduction": 0.74, "eager_int8_speedup": 2.5}}}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for uri in [u for u in args.models.split(",") if u]:
            result["models"].append(bench_model(uri, rounds=args.rounds, compile_=not args.quick, tmp=tmp))
            write_json_atomic(args.out, result)  # partial results survive a later failure
        xtr, ytr, xte, yte = fashion_mnist()
        model, train_info = trained_vit(xtr, ytr, args.epochs)
        result["fashion_mnist"] = bench_accuracy(model, train_info, xte, yte, tmp)
        write_json_atomic(args.out, result)
        if not args.no_joint:
            result["joint"] = bench_joint(model, xtr, ytr, xte, yte, steps=args.ft_steps)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    write_json_atomic(args.out, result)
    log("wrote", args.out, f"in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

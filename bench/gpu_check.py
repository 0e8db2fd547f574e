"""One prepared check of the CUDA paths, for a short session on a lent GPU (written to run in < 8 minutes on one
H200 with torch preinstalled and no network). Every section is guarded: a missing package or a failure is recorded
with its reason and the next section runs; the JSON is rewritten after each section, so a timeout keeps what ran.

    python bench/gpu_check.py                       # on the GPU machine: JSON to $OUT/gpu_check.json (or --out DIR)
    python bench/gpu_check.py --device cpu --quick  # here: the same script end to end on tiny sizes (9 min on
                                                    # this shared 2-core machine at load ~12; ResNet-50 dominates)

Sections:
  env              torch / CUDA / device, which optional packages are importable
  llm_sparsify     prunepilot.sparsify on a random-weight bf16 Llama (~0.9B on CUDA) saved as safetensors and
                   loaded through hf:DIR: resident (the whole model on the GPU) and forced offload (one block on the
                   GPU at a time), Wanda and SparseGPT, plus 2:4 (result.json's semi-structured kernel timings).
                   Wall time with synchronized timers, peak CUDA memory against the bf16 weights, peak RSS, and
                   whether offload gives the same masks as resident.
  semi_structured  2:4 weights as torch semi-structured sparse kernels vs dense F.linear on a stack of large
                   linears (fp16 and bf16, 4096 tokens), prunepilot.sparsify.kernels.semi_structured_speedup.
  resnet50_prune   prunepilot.prune of a torchvision ResNet-50 (random weights, random labelled batches) with
                   device=cuda, dtype=bf16, one round with fine-tuning (quick: one projected plan, no data);
                   latency of dense vs pruned (CUDA events on the GPU).
  ort_cuda         ONNX Runtime's CUDA provider, when installed, on the pruned ResNet-50 vs its CPU provider.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # the checkout's prunepilot, without installing it

import torch  # noqa: E402  (the one hard requirement)

OPTIONAL = ("transformers", "tokenizers", "safetensors", "torchvision", "onnx", "onnxruntime", "compressed_tensors",
            "rich", "pydantic", "torch_pruning", "timm")


class Check:
    def __init__(self, out: Path, budget_s: float, quick: bool, device: str) -> None:
        self.out, self.quick, self.device = out, quick, device
        self.t0, self.budget_s = time.perf_counter(), budget_s
        self.models: dict[str, Any] | None = None
        self.data: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                                     "mode": "quick" if quick else "full", "device": device, "sections": {},
                                     "skipped": {}}

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def run(self, name: str, fn: Callable[[], dict[str, Any]], need_s: float) -> None:
        if self.left() < need_s:
            self.data["skipped"][name] = f"out of time: {self.left():.0f} s left of the budget, ~{need_s:.0f} s needed"
            self.write()
            return
        t = time.perf_counter()
        try:
            got = fn()
            if "skipped" in got and len(got) == 1:
                self.data["skipped"][name] = got["skipped"]
            else:
                self.data["sections"][name] = got | {"section_s": round(time.perf_counter() - t, 2)}
        except Exception as exc:  # recorded, never fatal: the next section still runs
            self.data["sections"][name] = {"error": f"{type(exc).__name__}: {exc}"[:1500],
                                           "traceback": traceback.format_exc()[-3000:],
                                           "section_s": round(time.perf_counter() - t, 2)}
        self.write()

    def write(self) -> None:
        self.data["elapsed_s"] = round(time.perf_counter() - self.t0, 2)
        self.data["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.out)


def have(name: str) -> str | None:
    """The package's version when importable, else None."""
    try:
        mod = importlib.import_module(name)
    except Exception:
        return None
    return str(getattr(mod, "__version__", "?"))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def env(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
                            "cpu_threads": torch.get_num_threads(), "packages": {p: have(p) for p in OPTIONAL}}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info |= {"gpu": p.name, "capability": f"{p.major}.{p.minor}", "gpu_memory_gb": round(p.total_memory / 2**30, 1),
                 "bf16_supported": torch.cuda.is_bf16_supported()}
    try:
        import prunepilot

        info["prunepilot"] = str(Path(prunepilot.__file__).parent)
    except Exception as exc:
        info["prunepilot"] = f"not importable: {exc}"
    return info


# ------------------------------------------------------------------------------------------------ LLM sparsify
LLAMA_FULL = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 16,
              "num_attention_heads": 16, "num_key_value_heads": 8}  # ~0.89B parameters, untied head
LLAMA_QUICK = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2}


def _word_tokenizer(vocab: int) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab - 2)} | {"<unk>": vocab - 2, "<s>": vocab - 1}
    tk = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>")


def _build_llama(folder: Path, shape: dict[str, int], device: str) -> dict[str, Any]:
    """A random-weight bf16 Llama saved as safetensors (built on the GPU when there is one: seconds, not minutes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape, max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    t = time.perf_counter()
    with torch.device(device if device.startswith("cuda") else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(folder)
    _word_tokenizer(shape["vocab_size"]).save_pretrained(folder)
    n = sum(p.numel() for p in model.parameters())
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    files = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20
    return {"params": n, "weights_mb": round(files, 1), "build_s": round(time.perf_counter() - t, 2)}


def _docs(n: int, words: int, vocab: int) -> list[str]:
    g = torch.Generator().manual_seed(1)
    return [" ".join(f"w{int(i)}" for i in torch.randint(0, vocab - 2, (words,), generator=g)) for _ in range(n)]


def _masks(model: Any) -> dict[str, torch.Tensor]:
    from prunepilot.sparsify.calibrate import linear_layers, modules_by_name

    mods = modules_by_name(model, linear_layers(model))
    return {n: (m.weight.detach() == 0).cpu() for n, m in mods.items()}


def llm_sparsify(check: Check) -> dict[str, Any]:
    for pkg in ("transformers", "tokenizers", "safetensors"):
        if have(pkg) is None:
            return {"skipped": f"{pkg} is not installed"}
    from prunepilot.api import sparsify

    dev, quick = check.device, check.quick
    shape = LLAMA_QUICK if quick else LLAMA_FULL
    calib = {"calib_seqs": 4, "calib_seqlen": 32, "eval_seqs": 2, "eval_seqlen": 32, "fidelity_seqs": 1,
             "probe_seqs": 2, "probe_seqlen": 32} if quick \
        else {"calib_seqs": 16, "calib_seqlen": 512, "eval_seqs": 4, "eval_seqlen": 512, "fidelity_seqs": 1,
              "probe_seqs": 2, "probe_seqlen": 256}
    out: dict[str, Any] = {"shape": shape, "calibration": calib, "runs": []}
    with tempfile.TemporaryDirectory(prefix="gpu-check-llama-") as tmp:
        folder = Path(tmp) / "llama"
        out["model"] = _build_llama(folder, shape, dev)
        texts = _docs(64 if quick else 400, 48 if quick else 600, shape["vocab_size"])
        masks: dict[str, dict[str, torch.Tensor]] = {}
        arms = [("resident", "wanda", 0.5), ("offload", "wanda", 0.5), ("resident", "sparsegpt", 0.5),
                ("offload", "sparsegpt", 0.5), ("resident", "sparsegpt", "2:4")]
        for mode, method, sparsity in arms:
            if check.left() < (20 if quick else 60):
                out["runs"].append({"mode": mode, "method": method, "skipped": "out of time"})
                continue
            if dev.startswith("cuda"):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            sync(dev)
            t = time.perf_counter()
            r = sparsify(f"hf:{folder}", sparsity=sparsity, calib=texts, method=method, agent="uniform",
                                    device=dev, offload=(mode == "offload") if dev.startswith("cuda") else None,
                                    log=None, progress=False, **calib)
            sync(dev)
            wall = time.perf_counter() - t
            row: dict[str, Any] = {"mode": mode, "method": method, "sparsity": str(sparsity), "wall_s": round(wall, 2),
                                   "timings_s": r.raw.get("timings_s"), "memory": r.raw.get("memory"),
                                   "perplexity": r.metrics.get("perplexity"), "dense_perplexity": r.dense.get("perplexity"),
                                   "achieved": r.metrics.get("sparsity"), "fidelity": r.metrics.get("fidelity")}
            if dev.startswith("cuda"):
                peak = torch.cuda.max_memory_allocated() / 2**20
                row["peak_cuda_mb"] = round(peak, 1)
                row["peak_cuda_over_weights"] = round(peak / out["model"]["weights_mb"], 3)
            if r.raw.get("kernels"):
                row["kernels"] = r.raw["kernels"]
            key = f"{method}@{sparsity}"
            got = _masks(r.model)
            if key in masks:
                ref = masks[key]
                row["masks_equal_to_other_mode"] = all(torch.equal(got[n], ref[n]) for n in ref)
                row["masks_differing_share"] = round(sum(int((got[n] != ref[n]).sum()) for n in ref)
                                                     / sum(v.numel() for v in ref.values()), 8)
            else:
                masks[key] = got
            del r, got
            out["runs"].append(row)
            check.data["sections"]["llm_sparsify"] = out  # partial results survive a timeout
            check.write()
    return out


# ------------------------------------------------------------------------------------------- 2:4 kernels
def semi_structured(check: Check) -> dict[str, Any]:
    from prunepilot.engines import sparsity as sp
    from prunepilot.sparsify.kernels import semi_structured_speedup

    shapes = [(256, 256), (512, 256)] if check.quick else [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]
    dev = torch.device(check.device)
    out: dict[str, Any] = {}
    for dtype in (torch.float16, torch.bfloat16):
        lins = []
        for o, i in shapes:
            lin = torch.nn.Linear(i, o, bias=False).to(dev if dev.type == "cuda" else "cpu", dtype)
            with torch.no_grad():
                lin.weight.mul_(sp.magnitude_mask(lin.weight, 0.5, sp.parse_nm("2:4")).to(lin.weight.device))
            lins.append(lin)
        out[str(dtype).removeprefix("torch.")] = semi_structured_speedup(lins, dev, tokens=256 if check.quick else 4096,
                                                                         max_layers=len(lins))
        del lins
    return out


# ------------------------------------------------------------------------------------------- ResNet-50 prune
def _latency_ms(model: Any, x: torch.Tensor, reps: int) -> float:
    with torch.no_grad():
        for _ in range(3):
            model(x)
        if x.is_cuda:
            times = []
            for _ in range(reps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                model(x)
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
        else:
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                model(x)
                times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return times[len(times) // 2]


def resnet50_prune(check: Check) -> dict[str, Any]:
    if have("torchvision") is None:
        return {"skipped": "torchvision is not installed"}
    import copy

    import torchvision

    import prunepilot

    quick, dev = check.quick, check.device
    cuda = dev.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    size, batch, n_batches = (64, 4, 2) if quick else (224, 64, 8)
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None, num_classes=10)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 10, (batch,), generator=g))
               for _ in range(n_batches)]
    dense = copy.deepcopy(model).to(dev, dtype).eval()
    x = torch.randn(1 if quick else 32, 3, size, size, device=dev, dtype=dtype)
    reps = 5 if quick else 50
    dense_ms = _latency_ms(dense, x, reps)
    sync(dev)
    t = time.perf_counter()
    if quick:  # the plumbing only: one projected plan, no data (the agent round below costs minutes on a CPU)
        r = prunepilot.prune(model, torch.randn(1, 3, size, size), target_macs=0.5, device=dev,
                             dtype="bf16" if cuda else "float32", log=None)
    else:  # one agent round with fine-tuning, on the GPU in bf16
        r = prunepilot.prune(model, torch.randn(1, 3, size, size), target_macs=0.5, train=batches, val=batches,
                             rounds=1, finetune_steps=20, finetune_epochs=0, eval_limit=batch * n_batches,
                             device=dev, dtype="bf16" if cuda else "float32", history=False, log=None,
                             agent="sensitivity")
    sync(dev)
    wall = time.perf_counter() - t
    pruned = r.model.to(dev, dtype).eval()
    pruned_ms = _latency_ms(pruned, x, reps)
    out = {"input": list(x.shape), "dtype": str(dtype).removeprefix("torch."), "wall_s": round(wall, 2),
           "how": "one projected plan, no data" if quick else "agent sensitivity, 1 round, 20 fine-tuning steps",
           "within_band": r.within_band,
           "macs_ratio": round(r.metrics["macs"] / r.dense["macs"], 4) if r.metrics.get("macs") and r.dense.get("macs") else None,
           "metrics": {k: v for k, v in r.metrics.items() if isinstance(v, (int, float, str))},
           "timings_s": r.raw.get("timings_s"), "dense_ms": round(dense_ms, 4), "pruned_ms": round(pruned_ms, 4),
           "speedup": round(dense_ms / pruned_ms, 3) if pruned_ms else None, "timer": "cuda events" if cuda else "perf_counter"}
    check.models = {"pruned": r.model.float().cpu(), "size": size}  # for the ORT section (not written to the JSON)
    return out


# ------------------------------------------------------------------------------------------- ORT CUDA provider
def ort_cuda(check: Check) -> dict[str, Any]:
    ort_v, onnx_v = have("onnxruntime"), have("onnx")
    if ort_v is None or onnx_v is None:
        return {"skipped": f"onnxruntime {'missing' if ort_v is None else ort_v}, onnx {'missing' if onnx_v is None else onnx_v}"}
    import numpy as np
    import onnxruntime as ort

    providers = ort.get_available_providers()
    got = check.models
    if got is None:
        return {"skipped": "no pruned ResNet-50 (its section did not run)", "providers": providers}
    model, size = got["pruned"].eval(), got["size"]
    b = 1 if check.quick else 16
    x = torch.randn(b, 3, size, size)
    with tempfile.TemporaryDirectory(prefix="gpu-check-onnx-") as tmp:
        path = Path(tmp) / "pruned.onnx"
        torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["y"], dynamo=False)
        out: dict[str, Any] = {"providers": providers, "batch": b}
        with torch.no_grad():
            ref = model(x).numpy()
        for prov in ("CUDAExecutionProvider", "CPUExecutionProvider"):
            if prov not in providers:
                out[prov] = {"skipped": "provider not available in this onnxruntime"}
                continue
            sess = ort.InferenceSession(str(path), providers=[prov])
            feed = {"x": x.numpy()}
            y = sess.run(None, feed)[0]
            for _ in range(3):
                sess.run(None, feed)
            times = []
            for _ in range(5 if check.quick else 30):
                t = time.perf_counter()
                sess.run(None, feed)
                times.append((time.perf_counter() - t) * 1000)
            times.sort()
            out[prov] = {"median_ms": round(times[len(times) // 2], 4), "used": sess.get_providers()[0],
                         "max_abs_diff_vs_torch": float(np.abs(y - ref).max())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (proves the script end to end on a CPU)")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "results"),
                    help="folder for gpu_check.json (default $OUT, else bench/results)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting sections after this many seconds (default 450; --quick 1800)")
    args = ap.parse_args()
    if args.budget_s is None:
        args.budget_s = 1800.0 if args.quick else 450.0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA GPU visible to torch: nothing to check (use --device cpu --quick to test the script)")
        Check(Path(args.out) / "gpu_check.json", 0, args.quick, args.device).write()
        return
    name = "gpu_check_quick.json" if args.quick else "gpu_check.json"
    check = Check(Path(args.out) / name, args.budget_s, args.quick, args.device)
    check.data["sections"]["env"] = env(args.device)
    check.write()
    q = args.quick
    check.run("llm_sparsify", lambda: llm_sparsify(check), 30 if q else 150)
    check.run("semi_structured", lambda: semi_structured(check), 5 if q else 30)
    check.run("resnet50_prune", lambda: resnet50_prune(check), 20 if q else 90)
    check.run("ort_cuda", lambda: ort_cuda(check), 5 if q else 20)
    print(json.dumps({k: ("error" if "error" in v else "ok") for k, v in check.data["sections"].items()}
                     | {"skipped": check.data["skipped"]}, indent=1))
    print(f"wrote {check.out} in {check.data['elapsed_s']:.0f} s")


if __name__ == "__main__":
    main()

"""The export job: deployable artefacts (ONNX, optionally ORT int8) from a run folder, verified against the
PyTorch model. `prunepilot export` is a thin layer over `run_export`."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..errors import SourceError
from ..results import write_json_atomic

# kinds of result.json written by prunepilot commands; a run dir holding one was written by prunepilot
_RUN_KINDS = {"prune", "quantize", "compress", "sparsify", "demo"}


def _run_info(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "result.json"
    if not path.exists():
        return {}
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    return info if isinstance(info, dict) else {}


def load_run_model(run_dir: Path, *, trust: bool = False) -> tuple[nn.Module, torch.Tensor | None, str]:
    """The model saved in a run folder, safest artefact first: structure.json + model.safetensors (rebuilt from
    the recorded source, no pickle from the folder), else `model.pt2` (torch.export), else `model.pt`.

    `model.pt` is a pickled full module, which can run code on load: it is loaded only from a folder holding
    a prunepilot result.json (a run prunepilot wrote) or with `trust=True`; the same rule lets a rebuild
    unpickle a `file:` source the prune itself was trusted with.
    Returns (module, example input if known, which file was used).
    """
    if not run_dir.is_dir():
        raise SourceError("RUN_DIR must be a folder written by a prunepilot command", str(run_dir),
                          "pass e.g. runs/deit_q (the --out of prune / quantize / compress)")
    info = _run_info(run_dir)
    if info.get("kind") == "sparsify":
        exp = info.get("export") or {}
        how = ("prunepilot.sparsify.export.load_compressed" if exp.get("format") == "compressed-tensors"
               else "transformers' AutoModelForCausalLM.from_pretrained")
        raise SourceError("this is a sparsify run: its language model is exported by the run itself, as a "
                          "transformers folder; `prunepilot export` converts the vision runs of prune / quantize / "
                          "compress", str(run_dir),
                          f"load {exp['path']} with {how}" if exp.get("path") else
                          "the run was made with --no-export: run sparsify again without it to get the model folder")
    written_by_us = info.get("kind") in _RUN_KINDS and "environment" in info
    example = torch.randn(*info["input_shape"]) if "input_shape" in info else None
    if _rebuildable(run_dir, info):
        from ..engines.artifact import STATE_DICT, load_pruned

        loaded = load_pruned(run_dir, trust=trust or written_by_us)
        return loaded.module, example if example is not None else loaded.example_input, STATE_DICT
    pt2, pt = run_dir / "model.pt2", run_dir / "model.pt"
    if pt2.exists():
        ep = torch.export.load(str(pt2))
        if example is None and ep.example_inputs and ep.example_inputs[0]:
            example = torch.randn_like(ep.example_inputs[0][0])
        return ep.module(), example, "model.pt2"
    if not pt.exists() and (run_dir / "structure.json").is_file():
        raise SourceError("this run's model was handed in from Python, so structure.json records no source to rebuild "
                          "it from (and torch.export could not save it as model.pt2)", str(run_dir),
                          "build the module yourself and load model.safetensors (apply structure.json's allocation "
                          "and quantization), or re-run with pickle_module=True / --pickle to also get model.pt")
    if not pt.exists():
        raise SourceError("the run folder holds no saved model (structure.json + model.safetensors, model.pt2 or "
                          "model.pt)", str(run_dir), "run prunepilot prune/quantize/compress with --out pointing here first")
    if not (trust or written_by_us):
        raise SourceError("model.pt is a pickled module (it can run code when loaded) and this folder has no "
                          "prunepilot result.json", str(pt), "pass --trust if you trust where the folder came from")
    return _unpickle(pt), example, "model.pt"


def _rebuildable(run_dir: Path, info: dict[str, Any]) -> bool:
    """structure.json that records the model's source (a module handed in from Python has none) and is the
    folder's current model: a later command writing here (quantize, compress) leaves a stale one behind."""
    from ..engines.artifact import STRUCTURE, read_structure

    if not (run_dir / STRUCTURE).is_file():
        return False
    export = info.get("export")
    if info and not (isinstance(export, dict) and export.get("structure") == STRUCTURE):
        return False
    return read_structure(run_dir).get("model") is not None


def _unpickle(pt: Path) -> nn.Module:
    try:
        import torchao  # noqa: F401  (torchao-quantized modules need its tensor classes registered)
    except ImportError:
        pass
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation chatter from unpickling quantized storages
        obj = torch.load(str(pt), map_location="cpu", weights_only=False)
    if not isinstance(obj, nn.Module):
        raise SourceError("model.pt does not hold an nn.Module", type(obj).__name__, "re-run the command that wrote it")
    return obj.eval()


def _verify_inputs(example: torch.Tensor, data: Optional[str], samples: int, batch: int) -> tuple[list[torch.Tensor], str]:
    """Batches of `batch` inputs: real test images with --data, else seeded random tensors."""
    if data:
        from ..evaluate.classification import split_batch
        from ..sources.data import load_data

        bundle = load_data(data, input_shape=tuple(example.shape[1:]))
        loader = bundle.loader("test", batch_size=batch, limit=samples, shuffle=False)
        xs = [split_batch(b)[0] for b in loader]
        return [x for x in xs if len(x) == batch] or xs, f"{data} test split ({samples} samples)"
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(batch, *example.shape[1:], generator=gen) for _ in range(max(1, samples // batch))]
    return xs, f"{sum(len(x) for x in xs)} random inputs (pass --data for real ones)"


def run_export(run_dir: Path, *, verify: bool = True, int8: bool = False, trust: bool = False,
               exporter: str = "auto", data: Optional[str] = None, samples: int = 64,
               input_shape: Optional[tuple[int, ...]] = None) -> dict[str, Any]:
    from ..engines.onnx_export import export_and_verify
    from ..engines.quantize import dequantize_, quantized_layer_names

    model, example, source = load_run_model(run_dir, trust=trust)
    if input_shape is not None:
        example = torch.randn(*input_shape)
    if example is None:
        raise SourceError("the run folder does not record the model's input shape", str(run_dir),
                          "pass --input-shape, e.g. 1,3,224,224")
    notes = []
    to_export = model
    if quantized_layer_names(model):
        # eager dynamic-int8 modules have no ONNX symbolic: export the float twin whose weights are the
        # dequantized int8 values; --int8 then packs them again with ONNX Runtime
        to_export = copy.deepcopy(model)
        names = dequantize_(to_export)
        notes.append(f"{len(names)} eager int8 layers exported as float Linears with their int8-grid weights")
        if int8:
            notes.append("ONNX Runtime int8 quantizes every MatMul/Gemm, including layers the run kept in float")
    # a torch.export program is specialised to its example batch size: keep that batch everywhere
    static = source == "model.pt2"
    batch = example.shape[0] if static else min(8, samples)
    vin, vdesc = _verify_inputs(example, data, samples, batch) if verify else (None, "")
    res = export_and_verify(to_export, example, run_dir, int8=int8, verify_inputs=vin, exporter=exporter,
                            measure_latency=True, dynamic_batch=not static, judge_top1=data is not None) if verify else None
    if res is None:
        from ..engines.onnx_export import export_onnx, quantize_onnx_int8

        exp = export_onnx(to_export, example, run_dir / "model.onnx", exporter=exporter, dynamic_batch=not static)
        out: dict[str, Any] = {"fp32": exp.to_json()}
        if int8:
            out["int8_path"] = str(run_dir / "model.int8.onnx")
            out["int8_size_mb"] = quantize_onnx_int8(exp.path, run_dir / "model.int8.onnx") / 2**20
    else:
        if to_export is not model:  # judge the artefacts against the model the run actually produced
            from ..engines.onnx_export import verify_onnx

            top1 = 0.9 if data is not None else 0.0
            res.verify_fp32 = verify_onnx(res.fp32.path, model, vin, min_cosine=0.99, min_top1=top1)
            if res.int8_path is not None:
                res.verify_int8 = verify_onnx(res.int8_path, model, vin, min_cosine=0.98, min_top1=top1)
        if data is None:
            notes.append("top-1 agreement is recorded but not judged on random inputs; pass --data to judge it")
        out = res.to_json()
    out.update({"source": source, "verify_inputs": vdesc, "notes": notes, "input_shape": list(example.shape)})
    write_json_atomic(run_dir / "export.json", out)
    return out

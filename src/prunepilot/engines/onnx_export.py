"""ONNX deployment path: export, ONNX Runtime dynamic int8 quantization, verification, ORT latency.

Export tries the dynamo exporter (`torch.onnx.export(..., dynamo=True)`) first and falls back to the legacy
TorchScript exporter; the result says which one produced the file and why the first one failed.
Verification compares the ONNX model with the PyTorch model on the same inputs: max abs diff, cosine
similarity and top-1 agreement of the outputs.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import PrunepilotError, require

MB = 1024 * 1024


@dataclass(frozen=True)
class ExportResult:
    path: Path
    exporter: str  # "dynamo" or "torchscript"
    opset: int
    size_bytes: int
    seconds: float
    fallback_reason: str | None = None  # why the dynamo exporter was not used

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        d["size_mb"] = round(self.size_bytes / MB, 3)
        return d


@dataclass(frozen=True)
class Verification:
    max_abs_diff: float
    cosine: float  # over the flattened outputs of all samples
    top1_agreement: float | None  # fraction of rows whose argmax matches (None for non-2D outputs)
    n_samples: int
    passed: bool
    tolerance: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class OrtLatency:
    median_ms: float
    p90_ms: float
    runs: int
    threads: int


@dataclass
class DeployResult:
    """Paths and numbers of one export (+ optional int8) run."""

    fp32: ExportResult
    int8_path: Path | None = None
    int8_size_bytes: int | None = None
    verify_fp32: Verification | None = None
    verify_int8: Verification | None = None
    latency_fp32: OrtLatency | None = None
    latency_int8: OrtLatency | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "fp32": self.fp32.to_json(),
            "int8_path": None if self.int8_path is None else str(self.int8_path),
            "int8_size_mb": None if self.int8_size_bytes is None else round(self.int8_size_bytes / MB, 3),
            "verify_fp32": None if self.verify_fp32 is None else self.verify_fp32.to_json(),
            "verify_int8": None if self.verify_int8 is None else self.verify_int8.to_json(),
            "latency_fp32": None if self.latency_fp32 is None else asdict(self.latency_fp32),
            "latency_int8": None if self.latency_int8 is None else asdict(self.latency_int8),
        }


def _onnx_size(path: Path) -> int:
    total = path.stat().st_size
    data = path.with_name(path.name + ".data")
    if data.exists():
        total += data.stat().st_size
    return total


def export_onnx(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | Path,
    *,
    opset: int = 18,
    exporter: str = "auto",
    dynamic_batch: bool = True,
) -> ExportResult:
    """Export `model` to ONNX at `path`. `exporter`: "auto" (dynamo, then legacy), "dynamo" or "torchscript".

    The input is named `input` and the output `output`; with `dynamic_batch` the first axis is symbolic so
    verification and serving can use any batch size.
    """
    require("onnx", "onnx", "ONNX export")
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise PrunepilotError("the ONNX exporter is 'auto', 'dynamo' or 'torchscript'", exporter, "use --exporter auto")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        model.eval()
    except NotImplementedError:  # torch.export's unlifted GraphModule has no train/eval switch
        pass
    fallback_reason: str | None = None
    t0 = time.perf_counter()
    if exporter in ("auto", "dynamo"):
        try:
            _export_dynamo(model, example_input, path, opset, dynamic_batch)
            return ExportResult(path, "dynamo", opset, _onnx_size(path), time.perf_counter() - t0)
        except Exception as exc:  # the dynamo exporter rejects some graphs the legacy one handles
            if exporter == "dynamo":
                raise PrunepilotError("the dynamo ONNX exporter failed", f"{type(exc).__name__}: {str(exc)[:300]}",
                                      "retry with exporter='torchscript' (--exporter torchscript)") from exc
            fallback_reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    t0 = time.perf_counter()
    try:
        _export_torchscript(model, example_input, path, opset, dynamic_batch)
    except Exception as exc:
        raise PrunepilotError(
            "neither ONNX exporter could export this model",
            f"dynamo: {fallback_reason}; torchscript: {type(exc).__name__}: {str(exc)[:300]}",
            "export the float model (torchao int8 modules have no ONNX mapping; for int8 use --int8, which "
            "quantizes with ONNX Runtime), or pick the exporter explicitly with --exporter dynamo|torchscript",
        ) from exc
    return ExportResult(path, "torchscript", opset, _onnx_size(path), time.perf_counter() - t0, fallback_reason)


def _export_dynamo(model: nn.Module, x: torch.Tensor, path: Path, opset: int, dynamic_batch: bool) -> None:
    dyn = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            model, (x,), dynamo=True, opset_version=opset, input_names=["input"], output_names=["output"],
            dynamic_shapes=dyn, verbose=False, report=False, optimize=True,
        )
        # weights inside the .onnx file (single artefact) unless it would pass protobuf's 2 GB limit
        prog.save(str(path), external_data=False if _nbytes(model) < 1.8e9 else True)


def _export_torchscript(model: nn.Module, x: torch.Tensor, path: Path, opset: int, dynamic_batch: bool) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (x,), str(path), dynamo=False, opset_version=opset, input_names=["input"],
            output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None,
        )


def _nbytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def quantize_onnx_int8(src: str | Path, dst: str | Path, *, per_channel: bool = False) -> int:
    """ONNX Runtime dynamic int8 quantization of MatMul/Gemm weights; returns the new file size in bytes."""
    ortq = require("onnxruntime.quantization", "onnx", "ONNX Runtime int8 quantization")
    import logging

    src, dst = Path(src), Path(dst)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # ORT logs a "consider pre-processing" hint on the root logger every call
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ortq.quantize_dynamic(
                str(src), str(dst), weight_type=ortq.QuantType.QInt8, per_channel=per_channel,
                op_types_to_quantize=["MatMul", "Gemm"],
            )
    finally:
        root.setLevel(level)
    return _onnx_size(dst)


def ort_providers(device: str | None = None) -> list[str]:
    """CUDA first when it is asked for (or auto) and this onnxruntime build has it; the CPU always last."""
    ort = require("onnxruntime", "onnx", "running ONNX models")
    available = ort.get_available_providers()
    want_cuda = (device or "auto").startswith("cuda") or (device or "auto") == "auto"
    if want_cuda and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def ort_session(path: str | Path, *, threads: int | None = None, device: str | None = "cpu") -> Any:
    ort = require("onnxruntime", "onnx", "running ONNX models")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=ort_providers(device))


def _run(sess: Any, x: torch.Tensor) -> torch.Tensor:
    name = sess.get_inputs()[0].name
    return torch.from_numpy(sess.run(None, {name: x.detach().cpu().numpy()})[0])


def verify_onnx(
    path: str | Path,
    model: nn.Module,
    inputs: torch.Tensor | Iterable[torch.Tensor],
    *,
    min_cosine: float = 0.99,
    min_top1: float = 0.95,
    max_abs: float | None = None,
    threads: int | None = None,
) -> Verification:
    """Compare ONNX Runtime outputs with `model`'s on the same inputs (a tensor or an iterable of batches)."""
    sess = ort_session(path, threads=threads)
    batches = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    ref, got = [], []
    with torch.inference_mode():
        for x in batches:
            ref.append(model(x).float().reshape(x.shape[0], -1))  # (B, K)
            got.append(_run(sess, x).float().reshape(x.shape[0], -1))
    r, g = torch.cat(ref), torch.cat(got)  # (N, K)
    mad = float((r - g).abs().max())
    cos = float(torch.nn.functional.cosine_similarity(r.flatten(), g.flatten(), dim=0))
    top1 = float((r.argmax(1) == g.argmax(1)).float().mean()) if r.shape[1] > 1 else None
    passed = cos >= min_cosine and (top1 is None or top1 >= min_top1) and (max_abs is None or mad <= max_abs)
    tol = {"min_cosine": min_cosine, "min_top1": min_top1}
    if max_abs is not None:
        tol["max_abs"] = max_abs
    return Verification(mad, cos, top1, int(r.shape[0]), passed, tol)


def ort_latency(
    path: str | Path, example_input: torch.Tensor, *, warmup: int = 3, runs: int = 10, threads: int | None = None
) -> OrtLatency:
    sess = ort_session(path, threads=threads)
    name = sess.get_inputs()[0].name
    feed = {name: example_input.detach().cpu().numpy()}
    for _ in range(warmup):
        sess.run(None, feed)
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        ts.append((time.perf_counter() - t0) * 1000)
    ts.sort()
    return OrtLatency(statistics.median(ts), ts[min(len(ts) - 1, int(0.9 * len(ts)))], runs,
                      threads or torch.get_num_threads())


def export_and_verify(
    model: nn.Module,
    example_input: torch.Tensor,
    out_dir: str | Path,
    *,
    int8: bool = False,
    verify_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    measure_latency: bool = True,
    exporter: str = "auto",
    name: str = "model",
    dynamic_batch: bool = True,
    judge_top1: bool = True,
) -> DeployResult:
    """Export fp32 ONNX (+ ORT int8 when asked), verify both against `model`, time the ORT sessions.

    `judge_top1=False` records top-1 agreement without requiring it (random inputs to a random-weight model
    give near-tied logits, where agreement says little; cosine and max diff still decide).
    """
    out_dir = Path(out_dir)
    fp32 = export_onnx(model, example_input, out_dir / f"{name}.onnx", exporter=exporter, dynamic_batch=dynamic_batch)
    res = DeployResult(fp32)
    vin = verify_inputs if verify_inputs is not None else example_input
    res.verify_fp32 = verify_onnx(fp32.path, model, vin, min_top1=0.95 if judge_top1 else 0.0)
    if measure_latency:
        res.latency_fp32 = ort_latency(fp32.path, example_input)
    if int8:
        res.int8_path = out_dir / f"{name}.int8.onnx"
        res.int8_size_bytes = quantize_onnx_int8(fp32.path, res.int8_path)
        # int8 is lossy: judge it on cosine/top-1 only, with the fp32 model as reference
        res.verify_int8 = verify_onnx(res.int8_path, model, vin, min_cosine=0.98, min_top1=0.9 if judge_top1 else 0.0)
        if measure_latency:
            res.latency_int8 = ort_latency(res.int8_path, example_input)
    return res

"""The pruned-model artefact without a pickle: weights in model.safetensors, the recipe in structure.json (the
dense model's ModelSpec plus the kept widths). Loading rebuilds the dense model from its source, prunes it to the
recorded widths and loads the weights, so nothing in the run folder is executed."""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from pydantic import ValidationError
from torch import nn

from ..errors import SourceError
from ..results import write_json_atomic
from ..sources.models import LoadedModel, ModelSpec, file_sha256

FORMAT = 1
STATE_DICT, STRUCTURE, PROGRAM, MODULE = "model.safetensors", "structure.json", "model.pt2", "model.pt"


def write_atomic(path: Path, write: Callable[[str], None]) -> None:
    """`write(tmp)` then rename, so a crash never leaves a half-written file under the final name."""
    # keep the suffix: torch.export.save expects a .pt2 name
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; artefacts are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_program(model: nn.Module, example_input: torch.Tensor, out: Path) -> dict[str, Any]:
    """model.pt2 (torch.export, no pickle) where the architecture exports; the error otherwise."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from ..inputs import as_args_kwargs

            args, kwargs = as_args_kwargs(example_input)  # a tensor, positional tensors, or keyword inputs
            ep = torch.export.export(model, args, kwargs)
            write_atomic(out / PROGRAM, lambda p: torch.export.save(ep, p))
        return {"exported_program": PROGRAM, "export_error": None}
    except Exception as exc:  # some architectures do not export; say so instead of failing the run
        return {"exported_program": None, "export_error": f"{type(exc).__name__}: {str(exc)[:200]}"}


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict as safetensors stores it: contiguous CPU tensors that own their storage. Tied weights are
    cloned (stored twice) so every key is in the file and loads back with strict=True."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise SourceError("model.safetensors stores tensors only; this state_dict entry is not one",
                              f"{key} ({type(value).__name__})", "save this model with pickle_module=True")
        t = value.detach().cpu()
        storage = t.untyped_storage()
        whole = t.data_ptr() == storage.data_ptr() and t.nelement() * t.element_size() == storage.nbytes()
        if not t.is_contiguous() or not whole or storage.data_ptr() in seen:
            t = t.contiguous().clone()
        if t.nelement():
            seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def save_pruned(model: nn.Module, example_input: torch.Tensor, out_dir: str | Path, *, record: dict[str, Any],
                pickle_module: bool = False, program: nn.Module | None = None) -> dict[str, Any]:
    """Write model.safetensors, model.pt2 (where torch.export works), model.pt only if `pickle_module`, and
    structure.json last (so its presence means the weights it hashes are complete).

    `record` holds "model" (a ModelSpec dump, or None for a module handed in from Python), "allocation"
    ({"kept": {group: units}, "heads": {group: heads}}), optionally "protected" and "quantization"
    ({"backend": "eager", "layers": {name: scheme}}: applied again on load, dynamic int8 being a function of the
    float weights saved here). `program` is the module model.pt2 and model.pt hold (default `model`): the
    quantized model when `model` is its float source."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = _tensors(model)
    write_atomic(out / STATE_DICT, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    final = model if program is None else program
    info: dict[str, Any] = {"state_dict": STATE_DICT, "structure": STRUCTURE,
                            **export_program(final, example_input, out), "module": None}
    if pickle_module:
        write_atomic(out / MODULE, lambda p: torch.save(final, p))
        info["module"] = MODULE
    if record.get("model") is None:
        info["rebuild"] = ("load_pruned cannot rebuild this model: it was handed in from Python, so no source is "
                           "recorded; load model.pt2, or rebuild the module and load model.safetensors")
    full = {**record, "format": FORMAT, "params": sum(p.numel() for p in model.parameters()),
            # a tensor input's shape rebuilds the model; other inputs (dicts, token ids) come from the source again
            "input_shape": list(example_input.shape) if isinstance(example_input, torch.Tensor) else None,
            "state_dict_sha256": file_sha256(out / STATE_DICT),
            "files": {k: info[k] for k in ("state_dict", "exported_program", "module")}}
    write_json_atomic(out / STRUCTURE, full)
    return info


def read_structure(out_dir: str | Path) -> dict[str, Any]:
    import json

    path = Path(out_dir) / STRUCTURE
    if not path.is_file():
        raise SourceError("a pruned-model folder holds structure.json", str(path),
                          "pass the --out folder of a prune run (written by prunepilot >= this version)")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SourceError("structure.json is not valid JSON", f"{path}: {exc}", "re-run the prune that wrote it") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        got = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise SourceError(f"structure.json must have format {FORMAT}", got, "re-run the prune with this prunepilot")
    return record


def _verified_weights(path: Path, want: str | None) -> dict[str, torch.Tensor]:
    """Read the file once and hash those bytes, so the weights loaded are the ones checked."""
    from safetensors.torch import load

    if not path.is_file():
        raise SourceError("the pruned weights are missing", str(path), "restore model.safetensors or re-run the prune")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != want:
        raise SourceError("model.safetensors changed since structure.json was written (sha256 differs)", str(path),
                          "restore the original file or re-run the prune")
    return load(data)


def load_pruned(out_dir: str | Path, *, trust: bool = False) -> LoadedModel:
    """Rebuild the pruned model of a run folder: dense model from its recorded source, the same Structure the
    pruner analysed, the recorded allocation applied (the kept widths fix every shape), then the saved weights.

    `trust` is the caller's, never structure.json's: a recorded trust could be forged to unpickle a file."""
    from ..engines.structured import Allocation, apply_allocation
    from ..structure import analyse

    out = Path(out_dir)
    record = read_structure(out)
    if record.get("model") is None:
        raise SourceError("structure.json records no model source (the module was handed in from Python), so "
                          "load_pruned cannot rebuild it", str(out / STRUCTURE),
                          "load model.pt2, or build the module yourself, apply the allocation and load model.safetensors")
    try:
        spec = ModelSpec.model_validate(record["model"]).model_copy(update={"trust": trust})
        if "kept" not in record["allocation"]:
            raise KeyError("kept")
        alloc = Allocation.from_json(record["allocation"])
    except (ValidationError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SourceError("structure.json needs a valid 'model' spec and 'allocation' {kept, heads}",
                          f"{type(exc).__name__}: {str(exc)[:200]}", "re-run the prune that wrote it") from None
    spec.check_unchanged()
    # torch-pruning traces through autograd: build outside a caller's no_grad / inference_mode
    with torch.inference_mode(False), torch.enable_grad():
        weights = _verified_weights(out / STATE_DICT, record.get("state_dict_sha256"))
        dense = spec.load()
        shape = record.get("input_shape")
        x = torch.randn(*shape) if shape else dense.example_input
        model = dense.module
        if alloc.kept or alloc.heads or alloc.skip:  # nothing pruned (a quantize run): no structural analysis needed
            structure, _ = analyse(model, x, record.get("protected") or None)
            unknown = sorted(set(alloc.kept) - set(structure.groups)) + sorted(set(alloc.heads) - set(structure.groups))
            if unknown:
                raise SourceError("the recorded allocation names groups the rebuilt model does not have",
                                  ", ".join(unknown[:5]), "the model source changed since the prune: re-run it")
            apply_allocation(model, x, structure, alloc)
        try:
            model.load_state_dict(weights, strict=True)
        except RuntimeError as exc:
            raise SourceError("model.safetensors does not fit the rebuilt model", str(exc)[:300],
                              "the model source changed since the prune: re-run it") from None
    model.eval()
    _requantize(model, record.get("quantization"))
    # spec=None: spec.load() gives the dense model, not this one; load_pruned(out_dir) is how to get it again
    return LoadedModel(model, x, spec.uri, f"{spec.uri} pruned ({out})", "module", None)


def _requantize(model: nn.Module, quant: Any) -> None:
    """Apply the recorded quantization again (a compress run's int8 layers) to the rebuilt float model."""
    if not quant:
        return
    from ..engines.quantize import quantize_

    try:
        layers = {str(k): str(v) for k, v in quant["layers"].items()}
        backend = str(quant.get("backend", "eager"))
    except (KeyError, TypeError, AttributeError) as exc:
        raise SourceError("structure.json's 'quantization' needs {backend, layers: {name: scheme}}",
                          f"{type(exc).__name__}: {str(exc)[:200]}", "re-run the compress that wrote it") from None
    quantize_(model, layers, backend=backend, measure_size=False)  # type: ignore[arg-type]

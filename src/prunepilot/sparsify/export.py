"""Export a sparsified causal LM in its input's dtype and prove the files hold exactly the model's weights.

Formats:
  safetensors          save_pretrained: dense tensors in the checkpoint's dtype (a bf16 model stays bf16).
  compressed-tensors   the compressed-tensors `sparse-bitmask` layout for unstructured sparsity (per pruned
                       linear: `<name>.weight.compressed` = the non-zeros in row order, `.bitmask` = packed bits,
                       `.row_offsets`, `.shape`) and `sparse-24-bitmask` for 2:4 (`<name>.compressed` [out, in/2],
                       `.bitmask`, `.shape`), with `quantization_config.sparsity_config` in config.json written
                       from the package's BitmaskConfig / Sparse24BitMaskConfig. The compressed-tensors releases
                       that support transformers 5 (>= 0.15) dropped their sparse compressors (they last shipped in
                       0.14, which needs transformers < 5), so the tensors are packed here with the package's own
                       `pack_bitmasks`, and `load_compressed` reads them back.

Verification streams the written files tensor by tensor against the model (bitwise, no second model in
memory); small models (<= RELOAD_LIMIT_MB) are also reloaded whole and their logits compared. Every size is
the bytes of the files written.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import PlanError, SourceError, require

FORMATS = ("safetensors", "compressed-tensors")
RELOAD_LIMIT_MB = 64.0  # reload the export and compare logits only below this (it costs a second model: the
# peak would be twice the weights); larger exports are verified tensor by tensor, streamed
SHARD_BYTES = 2 * 2**30


def files_mb(folder: Path) -> float:
    """Bytes of the weight files in an export folder (every *.safetensors), in MiB."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors")) / 2**20


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 2**20


def _unique_state(model: Any) -> list[tuple[str, torch.Tensor]]:
    """The model's state dict with tied tensors once (the first name wins, as save_pretrained keeps it)."""
    seen: set[int] = set()
    out = []
    for name, t in model.state_dict().items():
        key = t.data_ptr() if t.numel() else id(t)
        if key in seen:
            continue
        seen.add(key)
        out.append((name, t))
    return out


def save_and_verify(model: Any, tokenizer: Any, out: Path, probe: torch.Tensor, *, fmt: str = "safetensors",
                    dtype: torch.dtype | None = None, sparse_names: list[str] | None = None,
                    nm: Any = None, sparsity: float | None = None) -> dict[str, Any]:
    """Write the model (+ tokenizer) to `out` in `fmt` and `dtype` (default: the model's), verify, measure."""
    from ..sources.hf_progress import hf_progress_off

    with hf_progress_off():
        return _save_and_verify(model, tokenizer, out, probe, fmt=fmt, dtype=dtype, sparse_names=sparse_names,
                                nm=nm, sparsity=sparsity)


def _save_and_verify(model: Any, tokenizer: Any, out: Path, probe: torch.Tensor, *, fmt: str,
                     dtype: torch.dtype | None, sparse_names: list[str] | None, nm: Any,
                     sparsity: float | None) -> dict[str, Any]:
    if fmt not in FORMATS:
        raise PlanError(f"an export format is one of {', '.join(FORMATS)}", fmt, "e.g. --format compressed-tensors")
    dtype = dtype or next(model.parameters()).dtype
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        _save_dense(model, out, dtype)
    else:
        _save_compressed(model, out, dtype, set(sparse_names or []), nm, sparsity)
    tokenizer.save_pretrained(out)
    info: dict[str, Any] = {"path": str(out), "format": fmt, "dtype": str(dtype).removeprefix("torch."),
                            "size_mb": round(files_mb(out), 3)}
    info.update(verify_files(model, out, dtype))
    weights_mb = sum(t.numel() * t.element_size() for _, t in _unique_state(model)) / 2**20
    if weights_mb <= RELOAD_LIMIT_MB and probe is not None:
        attn = getattr(model.config, "_attn_implementation", None)  # the same kernels, so logits can match exactly
        reloaded = load_compressed(out, attn=attn) if fmt == "compressed-tensors" else _reload_dense(out, dtype, attn)
        dev = model.get_input_embeddings().weight.device
        with torch.no_grad():
            a = model(input_ids=probe.to(dev), use_cache=False).logits.float().cpu()
            b = reloaded(input_ids=probe, use_cache=False).logits.float()
        same_dtype = dtype == next(model.parameters()).dtype
        info["max_abs_logit_diff"] = float((a - b).abs().max())
        info["identical"] = info["tensors_identical"] and (info["max_abs_logit_diff"] == 0.0 or not same_dtype)
        info["verified"] = "tensors + reload logits"
        del reloaded
    else:
        info["identical"] = info["tensors_identical"]
        info["verified"] = "tensors (streamed; model too large for a second copy)"
    return info


def _reload_dense(out: Path, dtype: torch.dtype, attn: str | None = None) -> Any:
    from transformers import AutoModelForCausalLM  # heavy; only when exporting

    return AutoModelForCausalLM.from_pretrained(str(out), dtype=dtype, attn_implementation=attn).eval()


def _save_dense(model: Any, out: Path, dtype: torch.dtype) -> None:
    if dtype == next(model.parameters()).dtype:
        model.save_pretrained(out)
        return
    # computing in another dtype than the checkpoint's (--dtype): convert on the way out (one copy in `dtype`)
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    old = model.config.dtype
    model.config.dtype = dtype
    try:
        model.save_pretrained(out, state_dict=state)
    finally:
        model.config.dtype = old


def _pack(mask: torch.Tensor) -> torch.Tensor:
    ct = require("compressed_tensors", "llm", "the compressed-tensors export")
    from compressed_tensors.utils.helpers import pack_bitmasks

    del ct
    return pack_bitmasks(mask.cpu())


def compress_weight(name: str, w: torch.Tensor, nm: Any) -> dict[str, torch.Tensor]:
    """One pruned linear's weight ([out, in]) as compressed-tensors tensors (names as the formats define)."""
    w = w.detach().cpu()
    mask = w != 0
    if nm is not None:  # sparse-24-bitmask: exactly n kept per group of m, so [out, in*n/m] values
        rows, cols = w.shape
        keep = mask.clone()
        short = (keep.reshape(rows, cols // nm.m, nm.m).sum(-1) < nm.n)
        if bool(short.any()):  # a group with fewer non-zeros (a weight that was already 0): keep zeros too
            g = keep.reshape(rows, cols // nm.m, nm.m)
            for r, c in short.nonzero().tolist():
                need = nm.n - int(g[r, c].sum())
                free = (~g[r, c]).nonzero().flatten()[:need]
                g[r, c, free] = True
            keep = g.reshape(rows, cols)
        prefix = name.removesuffix(".weight")
        return {f"{prefix}.shape": torch.tensor([rows, cols]).reshape(-1, 1),
                f"{prefix}.compressed": w[keep].reshape(rows, cols * nm.n // nm.m).contiguous(),
                f"{prefix}.bitmask": _pack(keep)}
    counts = mask.sum(-1)
    return {f"{name}.shape": torch.tensor(list(w.shape)), f"{name}.compressed": w[mask].contiguous(),
            f"{name}.bitmask": _pack(mask), f"{name}.row_offsets": torch.cumsum(counts, 0) - counts}


def _save_compressed(model: Any, out: Path, dtype: torch.dtype, sparse: set[str], nm: Any,
                     sparsity: float | None) -> None:
    from safetensors.torch import save_file

    require("compressed_tensors", "llm", "the compressed-tensors export")
    from compressed_tensors.config import BitmaskConfig, Sparse24BitMaskConfig

    weights = {f"{n}.weight" for n in sparse}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in _unique_state(model):
        t = t.detach().to("cpu", dtype) if t.is_floating_point() else t.detach().cpu()
        part = compress_weight(name, t, nm) if name in weights else {name: t.contiguous()}
        nbytes = sum(v.numel() * v.element_size() for v in part.values())
        if size and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1].update(part)
        size += nbytes
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    if len(shards) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    cfg_cls = Sparse24BitMaskConfig if nm is not None else BitmaskConfig
    sc = cfg_cls(global_sparsity=sparsity or 0.0, targets=sorted(sparse), ignore=["lm_head"],
                 **({"sparsity_structure": "unstructured"} if nm is None else {}))
    model.config.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    import compressed_tensors

    cfg["dtype"] = str(dtype).removeprefix("torch.")
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "version": compressed_tensors.__version__,
                                  "format": sc.format, "sparsity_config": sc.model_dump()}
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)


def _read_tensors(out: Path) -> dict[str, Any]:
    """name -> (file, key) over every safetensors file of an export."""
    from safetensors import safe_open

    where: dict[str, Any] = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                where[k] = f
    return where


def iter_decompressed(out: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a compressed-tensors sparse export, dense again, one at a time (files read lazily)."""
    from safetensors import safe_open

    require("compressed_tensors", "llm", "reading a compressed-tensors export")
    from compressed_tensors.utils.helpers import unpack_bitmasks

    where = _read_tensors(out)
    handles = {f: safe_open(str(f), framework="pt") for f in set(where.values())}
    get = lambda k: handles[where[k]].get_tensor(k)  # noqa: E731
    groups = {k.rsplit(".", 1)[0] for k in where if k.endswith(".bitmask")}
    parts = {f"{g}.{s}" for g in groups for s in ("shape", "compressed", "bitmask", "row_offsets")}
    for g in sorted(groups):
        shape = get(f"{g}.shape").flatten().tolist()
        values = get(f"{g}.compressed")
        mask = unpack_bitmasks(get(f"{g}.bitmask"), shape)
        w = torch.zeros(shape, dtype=values.dtype)
        w[mask] = values.flatten()
        yield (g if g.endswith(".weight") else f"{g}.weight"), w
    for k in where:
        if k not in parts:
            yield k, get(k)


def load_compressed(out: Path, dtype: torch.dtype | None = None, attn: str | None = None) -> Any:
    """Rebuild the causal LM of a compressed-tensors sparse export (config without its compression block)."""
    transformers = require("transformers", "llm", "reading a compressed-tensors export")
    cfg = json.loads((Path(out) / "config.json").read_text())
    if cfg.get("quantization_config", {}).get("quant_method") != "compressed-tensors":
        raise SourceError("not a compressed-tensors export (config.json has no compressed-tensors block)", str(out),
                          "pass a folder written with --format compressed-tensors")
    cfg.pop("quantization_config")
    config = transformers.AutoConfig.for_model(**cfg)
    if attn:
        config._attn_implementation = attn
    state = dict(iter_decompressed(Path(out)))
    dtype = dtype or next(iter(state.values())).dtype
    from transformers.initialization import no_init_weights

    with no_init_weights():  # weights come from the files; buffers (rotary inv_freq) are built from the config
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    left = [k for k in missing if k not in tied]
    if unexpected or left:
        raise SourceError("the compressed-tensors export does not match its config", (unexpected or left)[:3],
                          "re-export the model")
    return model.eval()


def verify_files(model: Any, out: Path, dtype: torch.dtype) -> dict[str, Any]:
    """Stream the written tensors back one at a time and compare them bitwise with the model's (cast to
    `dtype`). Returns tensors_identical and how many tensors were compared."""
    from safetensors import safe_open

    fmt_ct = (out / "config.json").is_file() and "compressed-tensors" in (out / "config.json").read_text()
    state = dict(_unique_state(model))
    compared, bad = 0, []
    if fmt_ct:
        stream = iter_decompressed(out)
    else:
        where = _read_tensors(out)
        handles = {f: safe_open(str(f), framework="pt") for f in set(where.values())}
        stream = ((k, handles[f].get_tensor(k)) for k, f in where.items())
    seen: set[str] = set()
    for k, got in stream:
        seen.add(k)
        if k not in state:
            continue
        ref = state[k].detach().cpu()
        ref = ref.to(dtype) if ref.is_floating_point() else ref
        compared += 1
        if got.dtype != ref.dtype or got.shape != ref.shape or not torch.equal(got, ref):
            bad.append(k)
        del got, ref
    missing = [k for k in state if k not in seen]
    # tied tensors are written once; anything else absent is a loss
    return {"tensors_identical": not bad and not missing, "tensors_compared": compared,
            "mismatched": (bad + missing)[:5]}

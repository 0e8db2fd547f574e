"""Model sources behind one URI syntax: torchvision:NAME, timm:NAME, file:PATH, py:module:function."""

from __future__ import annotations

import importlib
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from ..errors import SourceError

DEFAULT_IMAGE_SHAPE = (1, 3, 224, 224)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ModelSpec(BaseModel):
    """Everything needed to load the same model again (a journal keeps it, so a run can be rebuilt):
    the URI, the weights option, the state_dict path and content hash, the model file's hash, the input
    shape and whether the user trusted a pickle (recorded, never forced on resume)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    uri: str
    weights: Literal["random", "default"] = "random"
    trust: bool = False
    input_shape: tuple[int, ...] | None = None
    state_dict: str | None = None
    state_dict_sha256: str | None = None
    file_sha256: str | None = None  # for file: URIs

    @classmethod
    def build(cls, uri: str, *, weights: str = "random", trust: bool = False,
              input_shape: tuple[int, ...] | None = None, state_dict: str | Path | None = None) -> "ModelSpec":
        sd = str(Path(state_dict).expanduser().resolve()) if state_dict is not None else None
        sd_hash = file_sha256(sd) if sd is not None and Path(sd).is_file() else None
        fhash = None
        if uri.startswith("file:"):
            fp = Path(uri[5:]).expanduser()
            if fp.is_file():
                fhash = file_sha256(fp)
                uri = "file:" + str(fp.resolve())
        return cls(uri=uri, weights=weights, trust=trust, input_shape=tuple(input_shape) if input_shape else None,  # type: ignore[arg-type]
                   state_dict=sd, state_dict_sha256=sd_hash, file_sha256=fhash)

    def check_unchanged(self) -> None:
        """Refuse to rebuild a run on files that changed since it was journaled."""
        for what, path, want in (("state_dict", self.state_dict, self.state_dict_sha256),
                                 ("model file", self.uri[5:] if self.uri.startswith("file:") else None, self.file_sha256)):
            if path is None or want is None:
                continue
            if not Path(path).is_file():
                raise SourceError(f"the run's {what} is gone", path, "restore the file, or start a new run")
            if file_sha256(path) != want:
                raise SourceError(f"the run's {what} changed since the run was journaled (content hash differs)", path,
                                  "restore the original file, or start a new run on the new one")

    def load(self) -> "LoadedModel":
        return load_model(self.uri, weights=self.weights, trust=self.trust, input_shape=self.input_shape,
                          state_dict=self.state_dict)


@dataclass
class LoadedModel:
    module: nn.Module
    example_input: torch.Tensor
    uri: str
    description: str
    export_kind: str = "module"  # "module" | "torchscript" | "exported_program"
    spec: ModelSpec | None = None  # how to load it again; None for a module handed in from Python


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        raise SourceError("an input shape is comma-separated integers", text, "e.g. --input-shape 1,3,224,224") from None
    if not shape or any(s <= 0 for s in shape):
        raise SourceError("an input shape needs positive dimensions", text, "e.g. --input-shape 1,1,28,28")
    return shape


def _torchvision(name: str, weights: str) -> nn.Module:
    import torchvision

    if name not in torchvision.models.list_models():
        raise SourceError("unknown torchvision model", name, "see torchvision.models.list_models()")
    try:
        return torchvision.models.get_model(name, weights="DEFAULT" if weights == "default" else None)
    except Exception as exc:  # offline: the weights download fails
        raise SourceError(
            f"could not get torchvision's pretrained weights for '{name}' (no cache and no network?)",
            type(exc).__name__,
            "use --weights random for MAC/latency work, or place the file in ~/.cache/torch/hub/checkpoints",
        ) from None


def _timm(name: str, weights: str) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise SourceError("unknown timm model", name, "see timm.list_models()")
    try:
        return timm.create_model(name, pretrained=weights == "default")
    except Exception as exc:
        raise SourceError(
            f"could not get timm's pretrained weights for '{name}' (no cache and no network?)",
            type(exc).__name__,
            "use --weights random, or set HF_HOME to a cache that holds them",
        ) from None


def _input_shape_of(model: nn.Module) -> tuple[int, ...] | None:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and "input_size" in cfg:
        return (1, *cfg["input_size"])
    return None


def _load_file(path: Path, trust: bool) -> tuple[nn.Module, str]:
    if not path.exists():
        raise SourceError("model file not found", str(path), "check the path")
    # 1. torch.export ExportedProgram (.pt2): safe, no pickle.
    if path.suffix == ".pt2":
        ep = torch.export.load(str(path))
        return ep.module(), "exported_program"
    # 2. TorchScript archive: safe, no pickle of arbitrary classes.
    try:
        return torch.jit.load(str(path), map_location="cpu"), "torchscript"
    except Exception:
        pass
    # 3. A pickled full module: arbitrary code on load, so only with --trust.
    if not trust:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception:
            raise SourceError(
                "this file is a pickled module, which can run arbitrary code when loaded",
                str(path),
                "pass --trust if you trust its origin, or give a state_dict with --state-dict and py:module:factory",
            ) from None
        raise SourceError(
            "this file holds a state_dict (weights only), not a model",
            f"{path} ({type(obj).__name__})",
            "give the architecture as py:module:factory (or torchvision:/timm:) and this file with --state-dict",
        )
    obj = torch.load(str(path), map_location="cpu", weights_only=False)
    if not isinstance(obj, nn.Module):
        raise SourceError("the trusted file does not hold an nn.Module", type(obj).__name__, "save the whole module")
    return obj, "module"


def _load_factory(spec: str) -> nn.Module:
    mod_name, _, fn_name = spec.partition(":")
    if not fn_name:
        raise SourceError("a py: source is py:module:function", spec, "e.g. py:mypkg.models:build")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as exc:
        raise SourceError("could not import the model factory", spec, f"check the module path ({exc})") from None
    model = fn()
    if not isinstance(model, nn.Module):
        raise SourceError("a model factory must return an nn.Module", type(model).__name__, "return the model")
    return model


def load_model(
    uri: str,
    *,
    weights: str = "random",
    trust: bool = False,
    input_shape: tuple[int, ...] | None = None,
    state_dict: str | Path | None = None,
) -> LoadedModel:
    """Resolve a model URI to an eval-mode module plus an example input."""
    if weights not in ("random", "default"):
        raise SourceError("--weights is 'random' or 'default'", weights, "use one of them")
    scheme, _, rest = uri.partition(":")
    kind = "module"
    if scheme == "torchvision":
        model = _torchvision(rest, weights)
    elif scheme == "timm":
        model = _timm(rest, weights)
    elif scheme == "file":
        model, kind = _load_file(Path(rest).expanduser(), trust)
    elif scheme == "py":
        model = _load_factory(rest)
    elif scheme == "prunepilot":
        model, input_shape = _embedded(rest, input_shape)
    elif scheme == "hf-config":  # transformers models from local configs, random weights, keyword example inputs
        from .hf_models import load_hf_config

        return load_hf_config(rest, uri)
    else:
        hint = "use torchvision:NAME, timm:NAME, file:PATH, py:module:function, hf-config:DIR, prunepilot:fmnist_resnet20"
        folder = Path(uri).expanduser()
        if (folder / "config.json").is_file() or uri in ("smollm2", "gemma3-270m") or uri.endswith(".gguf"):
            hint = ("this looks like a language model: `prunepilot sparsify` takes it (and profiles its layers, "
                    "profile.json); for a transformers vision/encoder model from its config use hf-config:DIR")
        elif folder.is_file():
            hint = f"a model file is file:{uri} (torch.export .pt2, TorchScript, or a pickled module with --trust)"
        raise SourceError("unknown model source", uri, hint)
    if state_dict is not None:
        sd = torch.load(str(state_dict), map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        try:
            model.load_state_dict(sd)
        except RuntimeError as exc:
            raise SourceError("the state_dict does not fit the model", str(exc)[:300], "check the architecture") from None
    shape = input_shape or _input_shape_of(model) or getattr(model, "input_shape", None) or DEFAULT_IMAGE_SHAPE
    try:
        model.eval()
    except NotImplementedError:  # torch.export modules are already in inference form
        pass
    example = torch.randn(*shape)
    spec = ModelSpec.build(uri, weights=weights, trust=trust, input_shape=input_shape, state_dict=state_dict)
    desc = f"{uri} ({weights} weights)" if scheme in ("torchvision", "timm") else uri
    return LoadedModel(model, example, uri, desc, kind, spec)


EMBEDDED = ("fmnist_resnet20", "fmnist_resnet32", "fmnist_resnet56")


def _embedded(name: str, input_shape: tuple[int, ...] | None) -> tuple[nn.Module, tuple[int, ...]]:
    """prunepilot:fmnist_<arch>: the cached, trained Fashion-MNIST baselines (trained once when absent)."""
    if name not in EMBEDDED:
        raise SourceError("unknown embedded model", name, f"use one of {', '.join('prunepilot:' + e for e in EMBEDDED)}")
    from ..models.baseline import get_or_train_baseline

    model, info = get_or_train_baseline(name.removeprefix("fmnist_"))
    return model, input_shape or (1, *info["input_shape"])

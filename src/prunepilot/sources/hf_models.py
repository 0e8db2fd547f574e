"""`hf-config:NAME` models: Hugging Face transformers architectures built from a local config with random
weights (no hub download), with matching example inputs (pixel_values for vision, input_ids + attention_mask
for text). Sizes follow the base checkpoints; `NAME:small` gives a 2-layer variant for fast checks."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SourceError, require

SEQ_LEN = 128  # text example: one sequence of this many tokens


def _vit(small: bool):
    tf = require("transformers", "hf", "hf-config models")
    cfg = tf.ViTConfig(num_labels=1000, **({"num_hidden_layers": 2, "hidden_size": 192, "num_attention_heads": 3,
                                            "intermediate_size": 768} if small else {}))
    return tf.ViTForImageClassification(cfg), {"pixel_values": torch.randn(1, 3, cfg.image_size, cfg.image_size)}


def _swin(small: bool):
    tf = require("transformers", "hf", "hf-config models")
    kw = {"depths": [2, 2, 2, 2], "embed_dim": 48, "num_heads": [2, 4, 8, 16]} if small else {}
    cfg = tf.SwinConfig(num_labels=1000, **kw)  # defaults: Swin-T (embed 96, depths 2-2-6-2, window 7, 224 px)
    return tf.SwinForImageClassification(cfg), {"pixel_values": torch.randn(1, 3, cfg.image_size, cfg.image_size)}


def _bert(small: bool):
    tf = require("transformers", "hf", "hf-config models")
    kw = {"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 2, "intermediate_size": 512} if small else {}
    cfg = tf.BertConfig(num_labels=2, **kw)  # defaults: BERT-base
    ids = torch.randint(0, cfg.vocab_size, (1, SEQ_LEN))
    return tf.BertForSequenceClassification(cfg), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


BUILDERS = {"vit": _vit, "swin": _swin, "bert": _bert}


def build_hf_config(name: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """(model in eval mode with random weights, example inputs as keyword tensors)."""
    base, _, variant = name.partition(":")
    if base not in BUILDERS or variant not in ("", "small"):
        raise SourceError("unknown hf-config model", name, f"use one of {', '.join('hf-config:' + b for b in BUILDERS)} "
                                                           "(add ':small' for a 2-layer variant)")
    torch.manual_seed(0)
    model, inputs = BUILDERS[base](variant == "small")
    model.config.return_dict = True
    if hasattr(model.config, "_attn_implementation"):
        model.config._attn_implementation = "eager"  # plain matmuls torch-pruning can trace and the counter counts
    return model.eval(), inputs


def load_hf_config(name: str, uri: str):
    from .models import LoadedModel, ModelSpec

    model, inputs = build_hf_config(name)
    return LoadedModel(model, inputs, uri, f"{uri} (random weights from a local config)", "module",
                       ModelSpec.build(uri, weights="random"))

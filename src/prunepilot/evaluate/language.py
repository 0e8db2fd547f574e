"""Language-model quality: perplexity, fidelity to the dense model, a knowledge-retention probe."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Short factual prompts; only those the dense model completes confidently are kept as probes.
KNOWLEDGE_PROMPTS: tuple[str, ...] = (
    "The capital of France is", "The capital of Japan is", "The capital of Italy is",
    "The capital of Germany is", "The capital of Spain is", "The capital of Russia is",
    "The capital of Egypt is", "The capital of Canada is", "The largest planet in the solar system is",
    "Water is made of hydrogen and", "The chemical symbol for gold is", "The first man on the moon was Neil",
    "The author of Romeo and Juliet is William", "The theory of relativity was developed by Albert",
    "The Great Wall is located in", "The Eiffel Tower is located in", "The currency of the United States is the",
    "The opposite of hot is", "Monday, Tuesday,", "January, February, March,", "One, two, three, four,",
    "The Statue of Liberty is in New", "The Amazon river flows through South", "Paris is the capital of",
    "Tokyo is the capital of", "The color of the sky on a clear day is", "Python is a programming",
    "The speed of light is about 300,000 kilometers per", "A triangle has three", "The freezing point of water is",
    "Shakespeare was born in", "The human heart pumps", "The sun rises in the", "Ice is frozen",
    "The Mona Lisa was painted by Leonardo da", "The Pacific is the largest", "Bees make",
    "The boiling point of water is 100 degrees", "Photosynthesis happens in the leaves of", "Cats and dogs are",
)


@torch.no_grad()
def mean_nll(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token negative log-likelihood over [n, T] token blocks (T-1 predictions per block)."""
    total, count = 0.0, 0
    for i in range(0, blocks.shape[0], batch_size):
        b = blocks[i : i + batch_size]
        logits = model(input_ids=b, use_cache=False).logits[:, :-1].float()  # [b, T-1, V]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += b[:, 1:].numel()
    return total / max(count, 1)


def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4) -> float:
    return math.exp(mean_nll(model, blocks, batch_size))


@torch.no_grad()
def fidelity(model: nn.Module, dense: nn.Module, blocks: torch.Tensor, batch_size: int = 2) -> dict[str, float]:
    """Next-token top-1 agreement with the dense model and mean KL(dense || compressed) per token."""
    agree, kl, count = 0.0, 0.0, 0
    for i in range(0, blocks.shape[0], batch_size):
        b = blocks[i : i + batch_size]
        p = F.log_softmax(dense(input_ids=b, use_cache=False).logits.float(), -1)  # [b, T, V]
        q = F.log_softmax(model(input_ids=b, use_cache=False).logits.float(), -1)
        agree += float((p.argmax(-1) == q.argmax(-1)).sum())
        kl += float((p.exp() * (p - q)).sum())
        count += b.numel()
    return {"top1_agreement": agree / count, "kl": kl / count}


@torch.no_grad()
def knowledge_targets(model: nn.Module, tok: Any, min_prob: float = 0.3) -> list[dict[str, Any]]:
    """Facts the dense model completes confidently: prompt, its top-1 next token and probability."""
    out = []
    for prompt in KNOWLEDGE_PROMPTS:
        ids = _prompt_ids(tok, prompt)
        probs = F.softmax(model(input_ids=ids, use_cache=False).logits[0, -1].float(), -1)
        p, t = probs.max(-1)
        if float(p) >= min_prob:
            out.append({"prompt": prompt, "token": int(t), "text": tok.decode([int(t)]), "dense_prob": float(p)})
    return out


@torch.no_grad()
def knowledge_retention(model: nn.Module, tok: Any, targets: list[dict[str, Any]]) -> dict[str, Any]:
    """Share of the dense model's confident facts the compressed model still ranks first."""
    kept, probs = 0, []
    for t in targets:
        ids = _prompt_ids(tok, t["prompt"])
        pr = F.softmax(model(input_ids=ids, use_cache=False).logits[0, -1].float(), -1)
        kept += int(int(pr.argmax()) == t["token"])
        probs.append(float(pr[t["token"]]))
    n = len(targets)
    return {"facts": n, "retained": kept / n if n else float("nan"),
            "mean_prob": sum(probs) / n if n else float("nan")}


def _prompt_ids(tok: Any, prompt: str) -> torch.Tensor:
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    if getattr(tok, "prunepilot_add_bos", False) and tok.bos_token_id is not None:
        ids = [tok.bos_token_id, *ids]
    return torch.tensor([ids], dtype=torch.long)

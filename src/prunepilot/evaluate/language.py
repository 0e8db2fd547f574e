"""Language-model quality: perplexity, fidelity to the dense model, a knowledge-retention probe."""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
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


# float32 logits that exist at once in the evaluators: a chunk of positions is this many bytes of [tokens, vocab]
# (SmolLM2's 49k vocabulary: 85 tokens; Gemma's 262k: 16), so the log-softmax and KL temporaries beside it stay
# tens of MB whatever the vocabulary (a fixed 512 tokens made a ~600 MB transient on SmolLM2, 3 GB on Gemma)
LOGIT_CHUNK_BYTES = 16 << 20


def chunk_tokens(model: nn.Module) -> int:
    """Positions per logit chunk for this model's vocabulary (at least 8)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    vocab = int(weight.shape[0]) if weight is not None else int(getattr(model.config, "vocab_size", 1))
    return max(8, LOGIT_CHUNK_BYTES // (4 * max(vocab, 1)))


def input_device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


_SPLIT_OK: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def _split_logits(model: nn.Module, ids: torch.Tensor, chunk: int) -> Iterator[torch.Tensor]:
    h = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state  # [b, T, d]
    head, cap = model.get_output_embeddings(), getattr(model.config, "final_logit_softcapping", None)
    for i in range(0, h.shape[1], chunk):
        logits = head(h[:, i : i + chunk]).float()
        if cap is not None:  # Gemma 2/3
            logits = torch.tanh(logits / cap) * cap
        yield logits


def _can_split(model: nn.Module) -> bool:
    """Whether the logits are lm_head(decoder(ids)) (+ softcapping): checked once per model on 8 tokens
    against the model's own forward. A model whose head does more falls back to full logits."""
    ok = _SPLIT_OK.get(model)
    if ok is None:
        try:
            ids = torch.arange(min(8, model.config.vocab_size), device=input_device(model)).unsqueeze(0)
            with torch.no_grad():
                ref = model(input_ids=ids, use_cache=False).logits.float()
                got = torch.cat(list(_split_logits(model, ids, 3)), dim=1)
            ok = got.shape == ref.shape and float((got - ref).abs().max()) <= 1e-2 * float(ref.abs().max()) + 1e-4
        except Exception:  # no decoder / head split
            ok = False
        _SPLIT_OK[model] = ok
    return ok


def logit_chunks(model: nn.Module, ids: torch.Tensor, chunk: int | None = None) -> Iterator[torch.Tensor]:
    """Next-token logits [b, <=chunk/b, V] float32 for successive position chunks of ids [b, T] (about `chunk`
    tokens each; by default `chunk_tokens(model)`): the decoder's hidden states once, then lm_head per chunk, so a
    [batch, T, vocab] float32 tensor (805 MB for SmolLM2 at 4 x 1024) never exists."""
    with torch.no_grad():
        if _can_split(model):
            tokens = chunk or chunk_tokens(model)
            yield from _split_logits(model, ids, max(1, tokens // ids.shape[0]))  # chunk tokens over the batch
        else:
            yield model(input_ids=ids, use_cache=False).logits.float()


@torch.no_grad()
def mean_nll(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token negative log-likelihood over [n, T] token blocks (T-1 predictions per block)."""
    total, count = 0.0, 0
    dev = input_device(model)
    for i in range(0, blocks.shape[0], batch_size):
        b = blocks[i : i + batch_size].to(dev)
        pos = 0
        for logits in logit_chunks(model, b):  # [b, c, V]
            c = logits.shape[1]
            tgt = b[:, pos + 1 : pos + 1 + c]  # the last position of the block has no target
            lg = logits[:, : tgt.shape[1]]
            if tgt.numel():
                total += float(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1), reduction="sum"))
            pos += c
        count += b[:, 1:].numel()
    return total / max(count, 1)


def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4) -> float:
    return math.exp(mean_nll(model, blocks, batch_size))


class DenseReference:
    """The dense model's next-token log-probabilities on a few sequences (float16) and its top-1 tokens: fidelity
    is measured against these, so no copy of the dense model is kept. The log-probabilities ([T, V] per
    sequence: 200 MB for SmolLM2 at 2 x 1024) live in a scratch file and are read back a chunk at a time."""

    def __init__(self, blocks: torch.Tensor, top1: torch.Tensor, store: Any) -> None:
        self.blocks, self.top1, self.store = blocks, top1, store

    def rows(self, i: int, start: int, stop: int) -> torch.Tensor:
        """Sequence i's log-probabilities at positions start:stop ([stop-start, V] float16)."""
        return self.store.get_rows(f"logp:{i}", start, stop)

    @property
    def logp(self) -> list[torch.Tensor]:
        """Every sequence's [T, V] log-probabilities, read back whole (tests, small models)."""
        return [self.store.get(f"logp:{i}") for i in range(self.blocks.shape[0])]

    @property
    def nbytes(self) -> int:
        return self.store.nbytes

    def close(self) -> None:
        self.store.close()


@torch.no_grad()
def dense_reference(model: nn.Module, blocks: torch.Tensor) -> DenseReference:
    from ..sparsify.profile import TensorStore

    dev = input_device(model)
    store, top1 = TensorStore(), []
    for i in range(blocks.shape[0]):
        parts = [F.log_softmax(lg[0], -1) for lg in logit_chunks(model, blocks[i : i + 1].to(dev))]  # [c, V]
        top1.append(torch.cat([p.argmax(-1).cpu() for p in parts]))
        store.put(f"logp:{i}", torch.cat([p.half().cpu() for p in parts]))
        del parts
    return DenseReference(blocks, torch.stack(top1) if top1 else torch.empty(0, 0, dtype=torch.long), store)


@torch.no_grad()
def fidelity(model: nn.Module, dense: nn.Module | DenseReference, blocks: torch.Tensor | None = None,
             batch_size: int = 2) -> dict[str, float]:
    """Next-token top-1 agreement with the dense model and mean KL(dense || compressed) per token.

    `dense` is a DenseReference (preferred: no model copy) or a dense model evaluated on `blocks`."""
    ref = dense if isinstance(dense, DenseReference) else dense_reference(dense, blocks)  # type: ignore[arg-type]
    dev = input_device(model)
    agree, kl, count = 0.0, 0.0, 0
    for i in range(ref.blocks.shape[0]):
        pos = 0
        for lg in logit_chunks(model, ref.blocks[i : i + 1].to(dev)):
            q = F.log_softmax(lg[0], -1)  # [c, V]
            c = q.shape[0]
            p = ref.rows(i, pos, pos + c).to(q.device).float()
            agree += float((ref.top1[i, pos : pos + c].to(q.device) == q.argmax(-1)).sum())
            kl += float(F.kl_div(q, p, reduction="sum", log_target=True))  # sum exp(p) (p - q)
            pos += c
            count += c
    if ref is not dense:
        ref.close()
    return {"top1_agreement": agree / max(count, 1), "kl": kl / max(count, 1)}


@torch.no_grad()
def last_token_probs(model: nn.Module, tok: Any, prompts: list[str] | tuple[str, ...]) -> torch.Tensor:
    """Next-token probabilities after each prompt ([n, V] float32), all prompts in one forward pass: right-padded
    (causal attention: a position never sees the padding after it), the head applied to each prompt's last
    position only. A model whose head is not lm_head(decoder(ids)) runs one prompt at a time."""
    dev = input_device(model)
    seqs = [_prompt_ids(tok, p)[0] for p in prompts]
    if not seqs:
        return torch.empty(0, 0)
    if not _can_split(model):
        return torch.stack([F.softmax(model(input_ids=s[None].to(dev), use_cache=False).logits[0, -1].float(), -1)
                            for s in seqs])
    lengths = torch.tensor([len(s) for s in seqs])
    batch = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long)
    for i, s in enumerate(seqs):
        batch[i, : len(s)] = s
    h = model.get_decoder()(input_ids=batch.to(dev), use_cache=False).last_hidden_state  # [n, T, d]
    last = h[torch.arange(len(seqs), device=h.device), (lengths - 1).to(h.device)]  # [n, d]
    logits = model.get_output_embeddings()(last[:, None])[:, 0].float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return F.softmax(logits, -1)


@torch.no_grad()
def knowledge_targets(model: nn.Module, tok: Any, min_prob: float = 0.3) -> list[dict[str, Any]]:
    """Facts the dense model completes confidently: prompt, its top-1 next token and probability."""
    out = []
    probs = last_token_probs(model, tok, KNOWLEDGE_PROMPTS)
    for prompt, pr in zip(KNOWLEDGE_PROMPTS, probs):
        p, t = pr.max(-1)
        if float(p) >= min_prob:
            out.append({"prompt": prompt, "token": int(t), "text": tok.decode([int(t)]), "dense_prob": float(p)})
    return out


@torch.no_grad()
def knowledge_retention(model: nn.Module, tok: Any, targets: list[dict[str, Any]]) -> dict[str, Any]:
    """Share of the dense model's confident facts the compressed model still ranks first."""
    kept, probs = 0, []
    for t, pr in zip(targets, last_token_probs(model, tok, [t["prompt"] for t in targets]) if targets else []):
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

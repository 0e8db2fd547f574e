"""Unstructured and N:M sparsity for one linear weight: magnitude, Wanda, SparseGPT (pure tensor maths).

Conventions: a weight W is [out, in] (nn.Linear). A mask is a bool tensor of W's shape, True = kept.
N:M means at most N non-zeros in every M consecutive input weights of a row (2:4 -> 50%, 4:8 -> 50%).
Unstructured counts are exact: a layer asked for sparsity s loses exactly round(s * W.numel()) weights,
so a parameter-weighted global sparsity can be hit to the weight (see `exact_counts`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from ..errors import PlanError

METHODS: tuple[str, ...] = ("magnitude", "wanda", "sparsegpt")
# SparseGPT factorises H in float64 up to this input width (SmolLM2's widest, 1536, included); wider layers in
# float32 as the reference does: a [4096, 4096] float64 H with its factor is 270 MB of temporaries per layer, the
# largest transient of a ~1B run. A float32 factorisation that fails falls back to float64.
DOUBLE_MAX_COLS = 2048


@dataclass(frozen=True)
class NM:
    """Keep `n` of every `m` consecutive input weights."""

    n: int
    m: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def parse_nm(text: str) -> NM | None:
    """'2:4' -> NM(2, 4); anything without a colon -> None."""
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if not m:
        return None
    n, mm = int(m.group(1)), int(m.group(2))
    if not (0 < n < mm <= 64):
        raise PlanError("an N:M pattern keeps N of every M weights with 0 < N < M <= 64", text, "use 2:4 or 4:8")
    return NM(n, mm)


def count_pruned(numel: int, sparsity: float) -> int:
    return int(round(min(max(sparsity, 0.0), 1.0) * numel))


def exact_counts(sizes: list[int], ratios: list[float], target: float) -> list[int]:
    """Integer prune counts per layer near `ratios` whose sum is exactly round(target * sum(sizes)).

    Largest-remainder rounding of ratios already projected onto the target; each count stays in [0, size].
    """
    total = int(round(target * sum(sizes)))
    raw = [min(max(r, 0.0), 1.0) * s for r, s in zip(ratios, sizes)]
    counts = [int(math.floor(x)) for x in raw]
    short = total - sum(counts)
    order = sorted(range(len(raw)), key=lambda i: raw[i] - counts[i], reverse=(short > 0))
    step = 1 if short > 0 else -1
    i, limit = 0, (abs(short) + 1) * len(order) * 2
    while short != 0 and order and i < limit:
        j = order[i % len(order)]
        if 0 <= counts[j] + step <= sizes[j]:
            counts[j] += step
            short -= step
        i += 1
    return counts


def _row_counts(rows: int, k: int, device: torch.device) -> torch.Tensor:
    """Spread k pruned weights over rows as evenly as possible: [rows] int64."""
    base, extra = divmod(k, rows)
    counts = torch.full((rows,), base, dtype=torch.long, device=device)
    counts[:extra] += 1
    return counts


def mask_from_order(order: torch.Tensor, k: int) -> torch.Tensor:
    """Row-wise mask from a per-row ascending order of scores ([out, in] indices): prune k weights in total."""
    rows, cols = order.shape
    counts = _row_counts(rows, k, order.device)  # [rows]
    prune_sorted = torch.arange(cols, device=order.device).unsqueeze(0) < counts.unsqueeze(1)  # [rows, cols]
    mask = torch.ones(rows, cols, dtype=torch.bool, device=order.device)
    mask.scatter_(1, order.long(), ~prune_sorted)
    return mask


def nm_mask(score: torch.Tensor, nm: NM) -> torch.Tensor:
    """Keep the n highest scores in each group of m consecutive inputs: [out, in] bool."""
    rows, cols = score.shape
    if cols % nm.m:
        raise PlanError(f"N:M needs the input width divisible by M={nm.m}", cols, "use unstructured sparsity")
    groups = score.reshape(rows, cols // nm.m, nm.m)  # [out, in/m, m]
    drop = torch.topk(groups, nm.m - nm.n, dim=-1, largest=False).indices
    mask = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False)
    return mask.reshape(rows, cols)


def magnitude_mask(weight: torch.Tensor, sparsity: float, nm: NM | None = None) -> torch.Tensor:
    """Layer-wise magnitude: drop the smallest |W| (exact count), or the smallest in each N:M group."""
    score = weight.detach().abs().float()
    if nm is not None:
        return nm_mask(score, nm)
    k = count_pruned(score.numel(), sparsity)
    mask = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
    if k:
        mask[torch.topk(score.flatten(), k, largest=False).indices] = False
    return mask.reshape(score.shape)


def wanda_score(weight: torch.Tensor, act_sq_sum: torch.Tensor) -> torch.Tensor:
    """Wanda importance |W_ij| * ||X_j||_2, with act_sq_sum[j] = sum over tokens of x_j^2: [out, in]."""
    return weight.detach().abs().float() * act_sq_sum.float().clamp_min(0).sqrt().unsqueeze(0)


def wanda_mask(
    weight: torch.Tensor, act_sq_sum: torch.Tensor, sparsity: float, nm: NM | None = None
) -> torch.Tensor:
    """Wanda (Sun et al. 2023): per output row, drop the lowest |W|*||X|| (exact total count)."""
    score = wanda_score(weight, act_sq_sum)
    if nm is not None:
        return nm_mask(score, nm)
    return mask_from_order(torch.argsort(score, dim=1), count_pruned(score.numel(), sparsity))


@torch.no_grad()
def _inverse_factor(hessian: torch.Tensor, dead: torch.Tensor, percdamp: float, dtype: torch.dtype,
                    device: torch.device) -> torch.Tensor:
    """The upper Cholesky factor of the damped H^-1, float32, factorised in `dtype` in one [in, in] copy."""
    H = hessian.detach().to(device=device, dtype=dtype, copy=True)  # [in, in]
    H[dead, dead] = 1.0
    H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))
    # LAPACK works on column-major storage: on the transposed view of the symmetric H, torch factorises,
    # inverts and factorises again inside H's own storage (a row-major `out=` makes a copy per step: the
    # widest layer of a 1.7B model held 2 extra 256 MB matrices)
    A = H.mT
    torch.linalg.cholesky(A, out=A)
    torch.cholesky_inverse(A, out=A)
    torch.linalg.cholesky(A, upper=True, out=A)
    return A.float()


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    nm: NM | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh 2023): OBS pruning with weight reconstruction.

    hessian = sum over tokens of x x^T ([in, in]). Returns (new weight in weight's dtype, kept mask).
    Unstructured masks are chosen per column block with an exact count per block, so the layer loses
    exactly round(sparsity * numel) weights.
    """
    W, mask = _sparsegpt_sweep(weight, hessian, [sparsity], nm, blocksize, percdamp)
    return W.to(weight.dtype), mask


def sparsegpt_levels(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    levels: list[float],
    blocksize: int = 128,
    percdamp: float = 0.01,
    max_rows: int = 4096,
) -> list[torch.Tensor]:
    """SparseGPT of one layer at several unstructured sparsities, each exactly as sparsegpt_prune would give it.

    OBS updates never mix rows, so the levels' copies of W are stacked row-wise and swept together over one
    factorisation of H (at most `max_rows` stacked rows per sweep): one Python column loop for all levels."""
    per = max(1, max_rows // weight.shape[0])
    out: list[torch.Tensor] = []
    for i in range(0, len(levels), per):
        chunk = levels[i : i + per]
        W, _ = _sparsegpt_sweep(weight, hessian, chunk, None, blocksize, percdamp)
        out.extend(w.to(weight.dtype) for w in W.split(weight.shape[0]))
        del W
    return out


@torch.no_grad()
def _sparsegpt_sweep(weight: torch.Tensor, hessian: torch.Tensor, levels: list[float], nm: NM | None,
                     blocksize: int, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The OBS sweep over len(levels) row-stacked copies of W ([K*out, in] float32 weights and kept mask)."""
    rows1, cols = weight.shape
    W = weight.detach().float().repeat(len(levels), 1)  # [K*out, in]
    # float64 keeps the Cholesky stable on small models; wide layers use float32 as the reference does
    # (an [8192, 8192] float64 factorisation would need ~1.6 GB of temporaries)
    dead = (torch.diag(hessian) == 0).to(W.device)
    W[:, dead] = 0.0
    try:
        Hinv = _inverse_factor(hessian, dead, percdamp, torch.float64 if cols <= DOUBLE_MAX_COLS else torch.float32, W.device)
    except RuntimeError:  # torch.linalg.LinAlgError: not positive definite in float32
        Hinv = _inverse_factor(hessian, dead, percdamp, torch.float64, W.device)

    totals = [count_pruned(rows1 * cols, s) if nm is None else 0 for s in levels]
    mask = torch.ones_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()  # [K*out, b]
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]  # [b, b]
        d = torch.diag(Hinv1)  # [b]
        keep1 = torch.ones_like(W1, dtype=torch.bool)
        for j, total_k in enumerate(totals):  # exact per-block share of each level's count: cumulative rounding
            kb = int(round(total_k * i2 / cols)) - int(round(total_k * i1 / cols))
            if kb:
                rows = slice(j * rows1, (j + 1) * rows1)
                tmp = (W1[rows] ** 2 / d.unsqueeze(0) ** 2).flatten()
                keep1[rows].view(-1)[torch.topk(tmp, kb, largest=False).indices] = False
        for i in range(count):
            w = W1[:, i]
            if nm is not None and i % nm.m == 0:
                tmp = W1[:, i : i + nm.m] ** 2 / d[i : i + nm.m].unsqueeze(0) ** 2  # [out, m]
                drop = torch.topk(tmp, nm.m - nm.n, dim=1, largest=False).indices
                keep1[:, i : i + nm.m].scatter_(1, drop, False)
            q = w.clone()
            q[~keep1[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / Hinv1[i, i]  # [K*out]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = keep1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    W[~mask] = 0.0
    return W, mask


def sparsity_of(weight: torch.Tensor) -> float:
    return float((weight == 0).sum()) / weight.numel()


def is_nm(weight: torch.Tensor, nm: NM) -> bool:
    """True when every group of M consecutive inputs of every row has at most N non-zeros."""
    rows, cols = weight.shape
    if cols % nm.m:
        return False
    nz = (weight.reshape(rows, cols // nm.m, nm.m) != 0).sum(-1)
    return bool((nz <= nm.n).all())

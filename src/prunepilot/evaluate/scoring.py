"""Candidate scoring for structured pruning: BN recalibration, an equal short fine-tune, top-1 and fidelity."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..errors import PrunepilotError
from .batches import LossFn, split_batch


@dataclass
class ScoringConfig:
    finetune_steps: int = 60  # in-loop recovery: the same step budget for every candidate (fair ranking)
    eval_limit: int = 2000  # validation images scored per candidate
    bn_batches: int = 20
    lr: float = 0.01
    batch_size: int = 128
    seed: int = 0
    taylor_batches: int = 4  # calibration batches whose gradients rank channels for importance="taylor"


class Evaluator:
    """Scores candidates on held-out data. Every candidate gets the same batches in the same order: the
    fine-tune loader is rebuilt from the seed for each candidate, so a score depends on the candidate only
    (not on how many were scored before it), which also makes a resumed run score exactly as the first.

    The ranking score (`metrics["score"]`, higher is better) is the user's `evaluate(model)` when given, else
    top-1 on labelled validation batches, minus the mean squared error when the targets are floats (a
    regression), else top-1 agreement with the dense model (label-free)."""

    def __init__(self, data, dense: nn.Module, cfg: ScoringConfig, *,
                 evaluate: Callable[[nn.Module], float] | None = None, loss_fn: LossFn | None = None) -> None:
        from .classification import dense_logits, has_float_targets

        self.data, self.dense, self.cfg = data, dense, cfg
        self.user_evaluate, self.loss_fn = evaluate, loss_fn
        # materialised once: every candidate sees the same tensors, with no per-item decoding paid again
        self.val = list(data.loader("val", batch_size=256, limit=cfg.eval_limit, shuffle=False, seed=cfg.seed))
        self.calib = list(data.loader("train", batch_size=cfg.batch_size, limit=cfg.bn_batches * cfg.batch_size, seed=cfg.seed))
        self.labelled = bool(self.val) and split_batch(self.val[0])[1] is not None
        self.regression = self.labelled and has_float_targets(self.val[0])
        # a softmax over regression outputs means nothing: no fidelity (agreement/KL) for a regression
        self.dense_logits = dense_logits(dense, self.val) if self.val and not self.regression else []
        self.metric = ("evaluate" if evaluate is not None else "neg_mse" if self.regression
                       else "top1" if self.labelled else "agreement")
        self._dense_score: float | None = None

    def train_loader(self):
        return self.data.loader("train", batch_size=self.cfg.batch_size, seed=self.cfg.seed)

    def taylor_batches(self) -> list:
        return self.calib[: max(1, self.cfg.taylor_batches)]

    def dense_score(self) -> float:
        """The dense model's score as candidates are scored before recovery (BN recalibrated on a copy, no
        fine-tune); computed once, read by every sensitivity probe."""
        if self._dense_score is None:
            self._dense_score = self.score(copy.deepcopy(self.dense), steps=0)["score"]
        return self._dense_score

    def recalibrate(self, model: nn.Module) -> None:
        from .classification import has_batchnorm, recalibrate_batchnorm

        if has_batchnorm(model):
            recalibrate_batchnorm(model, self.calib, num_batches=self.cfg.bn_batches)

    def score(self, model: nn.Module, steps: int) -> dict[str, float]:
        from ..engines.recover import finetune
        from .classification import evaluate_classifier, evaluate_regression, fidelity

        self.recalibrate(model)
        out: dict[str, float] = {}
        if steps > 0:
            stats = finetune(model, self.train_loader(), steps=steps, lr=self.cfg.lr, seed=self.cfg.seed, progress=False,
                             loss_fn=self.loss_fn, teacher=None if self.labelled or self.loss_fn else self.dense)
            out["finetune_loss"] = stats.loss_last
        if self.regression:
            out["mse"] = evaluate_regression(model, self.val)["mse"]
            out["neg_mse"] = -out["mse"]
        elif self.labelled:
            out["accuracy"] = evaluate_classifier(model, self.val)["top1"]
        if self.dense_logits:
            fid = fidelity(model, self.dense_logits, self.val)
            out["fidelity_agreement"], out["fidelity_kl"] = fid["agreement"], fid["kl"]
        if self.user_evaluate is not None:
            model.eval()
            value = self.user_evaluate(model)
            try:
                out["evaluate"] = float(value)
            except (TypeError, ValueError):
                raise PrunepilotError("evaluate(model) must return a number (higher is better)", repr(value)[:80],
                                      "return e.g. accuracy or -loss as a float") from None
            model.eval()
        key = {"evaluate": "evaluate", "top1": "accuracy", "neg_mse": "neg_mse", "agreement": "fidelity_agreement"}[self.metric]
        if key not in out:
            raise PrunepilotError("candidates need a score", "no labels, no dense outputs and no evaluate()",
                                  "pass val= batches or evaluate=")
        out["score"] = out[key]
        return out


def measure_sensitivity(pruner, evaluator: Evaluator, ratio: float = 0.4) -> dict[str, float]:
    """Per family: accuracy lost when that family alone is pruned by `ratio` (BN recalibrated), as z-scores."""
    from ..engines.structured import apply_allocation
    from ..allocation import Allocation

    st = pruner.structure
    drops: dict[str, float] = {}
    base = evaluator.dense_score()
    for fam, names in st.families.items():
        kept = {n: max(1, int(round(st.groups[n].units * (1 - ratio)))) if n in names else st.groups[n].units for n in st.groups}
        model = apply_allocation(copy.deepcopy(pruner.dense), pruner.x, st, Allocation(kept, {}))
        drops[fam] = base - evaluator.score(model, steps=0)["score"]
    vals = list(drops.values())
    mu = sum(vals) / len(vals)
    sd = (sum((v - mu) ** 2 for v in vals) / len(vals)) ** 0.5
    return {f: (v - mu) / (sd + 1e-8) for f, v in drops.items()}


MAX_BLOCK_PROBES = 32  # blocks probed per model (the heaviest by MACs), one evaluation each


def measure_block_sensitivity(pruner, evaluator: Evaluator, rows: list[dict]) -> list[dict]:
    """Per skippable block (`rows` from blocks.block_rows): the score lost when that block alone is replaced
    by the identity (BN recalibrated, no fine-tune), as `score_drop`. Blocks past `MAX_BLOCK_PROBES` get none, so
    no strategist skips them blind."""
    from ..allocation import Allocation
    from ..engines.structured import apply_allocation

    if not rows:
        return rows
    base = evaluator.dense_score()
    probed = {r["block"] for r in sorted(rows, key=lambda r: -r["macs_share"])[:MAX_BLOCK_PROBES]}
    out = []
    for r in rows:
        if r["block"] in probed:
            model = apply_allocation(copy.deepcopy(pruner.dense), pruner.x, pruner.structure,
                                     Allocation({}, {}, (r["block"],)))
            r = {**r, "score_drop": round(base - evaluator.score(model, steps=0)["score"], 5)}
        out.append(r)
    return out

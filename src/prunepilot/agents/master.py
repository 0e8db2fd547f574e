"""Master: the agent loop. propose -> project -> apply to a fresh copy -> short recovery -> evaluate -> judge ->
record. Anytime: the best feasible candidate so far is always on disk; a killed run resumes from the journal."""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..budget import ResolvedBudget
from ..engines.structured import Allocation, apply_allocation
from ..journal import Journal
from ..pipeline import Pruner
from ..plan import Plan
from ..results import write_json_atomic


@dataclass
class SearchConfig:
    rounds: int = 8
    finetune_steps: int = 60  # in-loop recovery: the same step budget for every candidate (fair ranking)
    eval_limit: int = 2000  # validation images scored per candidate
    bn_batches: int = 20
    patience: int = 4  # stop after this many rounds without improvement
    wall_time_s: float | None = None
    lr: float = 0.01
    batch_size: int = 128
    seed: int = 0
    sensitivity_ratio: float = 0.4


class Evaluator:
    """Scores candidates on held-out data: BN recalibration, short fine-tune, top-1 (or fidelity without labels)."""

    def __init__(self, data, dense: nn.Module, cfg: SearchConfig) -> None:
        from ..evaluate.classification import dense_logits

        self.data, self.dense, self.cfg = data, dense, cfg
        # Scoring sets are materialised once: every candidate sees the same tensors, and no per-item
        # decoding is paid again for each of the dozens of candidates a search scores.
        self.val = _materialise(data.loader("val", batch_size=256, limit=cfg.eval_limit, shuffle=False, seed=cfg.seed))
        self.calib = _materialise(data.loader("train", batch_size=cfg.batch_size, limit=cfg.bn_batches * cfg.batch_size, seed=cfg.seed))
        self.train = data.loader("train", batch_size=cfg.batch_size, seed=cfg.seed)
        self.dense_logits = dense_logits(dense, self.val)

    def recalibrate(self, model: nn.Module) -> None:
        from ..evaluate.classification import has_batchnorm, recalibrate_batchnorm

        if has_batchnorm(model):
            recalibrate_batchnorm(model, self.calib, num_batches=self.cfg.bn_batches)

    def score(self, model: nn.Module, steps: int) -> dict[str, float]:
        from ..engines.recover import finetune
        from ..evaluate.classification import evaluate_classifier, fidelity

        self.recalibrate(model)
        out: dict[str, float] = {}
        if steps > 0:
            stats = finetune(model, self.train, steps=steps, lr=self.cfg.lr, seed=self.cfg.seed, progress=False)
            out["finetune_loss"] = stats.loss_last
        out["accuracy"] = evaluate_classifier(model, self.val)["top1"]
        fid = fidelity(model, self.dense_logits, self.val)
        out["fidelity_agreement"], out["fidelity_kl"] = fid["agreement"], fid["kl"]
        return out


def _materialise(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x, y) for x, y in loader]


def measure_sensitivity(pruner: Pruner, evaluator: Evaluator, ratio: float = 0.4) -> dict[str, float]:
    """Per family: accuracy lost when that family alone is pruned by `ratio` (BN recalibrated), as z-scores."""
    st = pruner.structure
    drops: dict[str, float] = {}
    base = evaluator.score(copy.deepcopy(pruner.dense), steps=0)["accuracy"]
    for fam, names in st.families.items():
        kept = {n: max(1, int(round(st.groups[n].units * (1 - ratio)))) if n in names else st.groups[n].units for n in st.groups}
        model = apply_allocation(copy.deepcopy(pruner.dense), pruner.x, st, Allocation(kept, {}))
        drops[fam] = base - evaluator.score(model, steps=0)["accuracy"]
    vals = list(drops.values())
    mu = sum(vals) / len(vals)
    sd = (sum((v - mu) ** 2 for v in vals) / len(vals)) ** 0.5
    return {f: (v - mu) / (sd + 1e-8) for f, v in drops.items()}


def divergence_guidance(history: list[dict]) -> list[str]:
    """Plain-code rules (as in AgenticPruner) whose findings are handed to the analyst as explicit guidance."""
    notes: list[str] = []
    if len(history) < 2:
        return notes
    accs = [h.get("metrics", {}).get("accuracy") for h in history]
    scored = [a for a in accs if a is not None]
    last = history[-1]
    for h in history[:-1]:
        if h.get("projected_ratios") == last.get("projected_ratios"):
            notes.append(f"repeated plan: round {last['round']} produced the same allocation as round {h['round']}; try a different shape")
            break
    if scored and accs[-1] is not None and accs[-1] < 0.5 * max(scored):
        notes.append(f"accuracy collapse in round {last['round']} ({accs[-1]:.3f} vs best {max(scored):.3f}): move back towards the best plan")
    best_round = max(range(len(accs)), key=lambda i: accs[i] if accs[i] is not None else -1)
    if len(history) - 1 - best_round >= 3:
        notes.append(f"stagnation: no improvement for {len(history) - 1 - best_round} rounds since round {history[best_round]['round']}")
    if len(scored) >= 4:
        d = [b - a for a, b in zip(scored, scored[1:])]
        flips = sum(1 for a, b in zip(d, d[1:]) if a * b < 0)
        if flips >= 0.4 * max(1, len(d) - 1) and flips >= 2:
            notes.append("oscillation: accuracy alternates up and down; make smaller changes around the best plan")
    return notes


def _strategist_name(s: Any) -> str:
    return getattr(s, "name", type(s).__name__)


class Master:
    def __init__(
        self,
        pruner: Pruner,
        budget: ResolvedBudget,
        strategist: Any,
        evaluator: Evaluator | None,
        journal: Journal,
        run_id: str,
        out: Path,
        cfg: SearchConfig,
        log: Callable[[str], None] = print,
    ) -> None:
        self.pruner, self.budget, self.strategist, self.evaluator = pruner, budget, strategist, evaluator
        self.journal, self.run_id, self.out, self.cfg, self.log = journal, run_id, out, cfg, log

    def budget_json(self) -> dict:
        return self.budget.to_json()

    def run(self) -> dict[str, Any] | None:
        """Continue the loop from whatever the journal already holds; return the best attempt."""
        t0 = time.perf_counter()
        profile = self.pruner.profile.compact()
        history = self.journal.attempts(self.run_id)  # non-empty when resuming: those rounds are not redone
        while len(history) < self.cfg.rounds:
            if self.cfg.wall_time_s and time.perf_counter() - t0 > self.cfg.wall_time_s:
                self.log("stopping: wall-time budget spent")
                break
            if self._stale(history):
                self.log(f"stopping: no improvement in {self.cfg.patience} rounds")
                break
            rnd = len(history)
            rec = self._round(rnd, profile, history)
            history.append(rec)
        return self.best(history)

    def _stale(self, history: list[dict]) -> bool:
        if len(history) <= self.cfg.patience:
            return False
        best = self.best(history)
        return best is not None and len(history) - 1 - best["round"] >= self.cfg.patience

    @staticmethod
    def best(history: list[dict]) -> dict | None:
        ok = [h for h in history if h.get("within_band") and h.get("verdict") != "failed"]
        if not ok:
            return None
        return max(ok, key=lambda h: (h.get("metrics", {}).get("accuracy") or 0.0, -h["round"]))

    def _round(self, rnd: int, profile: dict, history: list[dict]) -> dict:
        t = time.perf_counter()
        guidance = divergence_guidance(history)
        # the monitor's findings ride on the latest attempt, where the analyst reads them
        hist_for_agent = [dict(h) for h in history]
        if hist_for_agent:
            hist_for_agent[-1]["guidance"] = guidance
        result = self.strategist.propose(profile, self.budget_json(), hist_for_agent, seed=self.cfg.seed)
        plan: Plan = getattr(result, "plan", result)
        llm_calls = getattr(result, "llm_calls", []) or []
        fallback = getattr(result, "fallback_reason", None)
        for call in llm_calls:
            self.journal.record_llm_call(self.run_id, rnd, call)
            with open(self.out / "llm_calls.jsonl", "a") as fh:
                fh.write(json.dumps({"round": rnd, **{k: v for k, v in call.items() if k != "messages"}}, default=str) + "\n")
        rec: dict[str, Any] = {"round": rnd, "strategist": _strategist_name(self.strategist), "plan": plan.model_dump(),
                               "rationale": plan.rationale, "fallback_reason": fallback, "guidance": guidance}
        try:
            cand = self.pruner.candidate(plan, self.budget)
            metrics = dict(cand.metrics)
            if self.evaluator is not None:
                metrics.update(self.evaluator.score(cand.model, self.cfg.finetune_steps))
            within = all(self.budget.within(m, metrics[m]) for m in self.budget.goals if m in metrics)
            rec.update(
                projected_ratios=cand.projection.ratios(self.pruner.structure),
                predicted=cand.projection.predicted,
                metrics=metrics,
                errors={m: self.budget.error(m, metrics[m]) for m in self.budget.goals if m in metrics},
                within_band=within,
                projection_reason=cand.projection.reason,
            )
            prev = self.best(history)
            better = within and (prev is None or (metrics.get("accuracy") or 0) > (prev["metrics"].get("accuracy") or 0))
            rec["verdict"] = "best" if better else ("infeasible" if not within else "worse")
            if better:
                torch.save(cand.model, self.out / "best_model.tmp")
                (self.out / "best_model.tmp").replace(self.out / "best_model.pt")
                write_json_atomic(self.out / "best_plan.json", plan.model_dump())
            rec["reflection"] = self._reflection(rec, prev)
        except Exception as exc:  # a bad plan wastes an attempt, never the run
            rec.update(verdict="failed", within_band=False, metrics={}, reflection=f"failed: {type(exc).__name__}: {str(exc)[:300]}")
        rec["seconds"] = time.perf_counter() - t
        self.journal.record_attempt(self.run_id, rnd, rec)
        with open(self.out / "attempts.jsonl", "a") as fh:
            fh.write(json.dumps(rec, default=str) + "\n")
        acc = rec.get("metrics", {}).get("accuracy")
        err = rec.get("errors", {})
        self.log(f"round {rnd} [{rec['strategist']}] {rec['verdict']}: "
                 + ", ".join(f"{m} {e:+.2%}" for m, e in err.items())
                 + (f", accuracy {acc:.4f}" if acc is not None else "") + f" ({rec['seconds']:.0f}s)")
        return rec

    @staticmethod
    def _reflection(rec: dict, prev: dict | None) -> str:
        acc = rec["metrics"].get("accuracy")
        if acc is None:
            return "no accuracy measured (no data given)"
        if prev is None:
            return f"first feasible point: accuracy {acc:.4f}"
        pacc = prev["metrics"].get("accuracy") or 0
        ratios = rec.get("projected_ratios", {})
        pr = prev.get("projected_ratios", {})
        moved = sorted(((ratios.get(k, 0) - pr.get(k, 0)), k) for k in ratios)
        more = [k for d, k in moved[-2:] if d > 0.02]
        less = [k for d, k in moved[:2] if d < -0.02]
        return (f"accuracy {acc:.4f} vs best {pacc:.4f} (round {prev['round']}, {acc - pacc:+.4f}); "
                f"pruned more in {more or 'none'}, less in {less or 'none'}")

"""The sparsify job's prompt kit for the LLM analyst: per-group sparsity of a decoder LLM's linear layers.

The reply is data: group ids validated (unknown names rejected), values clamped to [current sparsity on the
ramp, the sparsity ceiling]; the loop keeps whichever measured allocation has the lowest probe KL, so a weak
proposal costs one probe and cannot make the result worse."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

from ..plan import Plan
from .llm.base import LLMReply, Message
from .llm.parsing import extract_json

if TYPE_CHECKING:
    from .context import Context

SYSTEM = """You are a model-compression analyst. You choose how much unstructured sparsity each group of
linear layers of a decoder language model gets, so that the model reaches a global parameter-weighted
sparsity target with the least damage. Groups are "layer kind @ block range".
Signals per group: params_share (fraction of prunable weights), wanda_z and grad_z (z-scores across
layers; higher = more important), outlier_ratio (OWL: share of outlier Wanda scores; more outliers =
keep more), kl_rise_per_1pct (measured: rise of the KL divergence from the dense model per 1% of global
sparsity moved into this group at the uniform target; lower = cheaper to prune), sparsity (current).
block_costs gives the same measured cost per decoder block. Prune cheap groups more, costly ones less.
Phase "ramp": reach this_step_level; a group may not go below its current sparsity. Phase "refine": the
level is the target; propose a better allocation than the best so far (history shows each candidate's
probe_kl; lower is better; rejected candidates are rolled back). The deterministic machinery rescales
your numbers so the parameter-weighted mean equals the level exactly, so relative differences matter.
Answer with one JSON object only: {"ratios": {GROUP: SPARSITY, ...}, "rationale": "...", "reflection": "..."}."""

EVOLVE_SYSTEM = """You steer an evolutionary search that allocates unstructured sparsity across groups of linear
layers of a decoder language model ("layer kind @ block range") at a fixed global parameter-weighted
sparsity. Fitness is the KL divergence of the pruned model from the dense one on probe text (lower is
better). Offspring are small random moves of pruned weights between groups; each is screened on part of
the probe and the most promising are re-scored on all of it against the best so far.
You see: the best allocation per group (sparsity), each group's params_share and measured kl_rise_per_1pct
(cost of moving 1% of global sparsity into it; lower = cheaper), and the recent offspring with the group
moves they made, their probe_kl and whether they were promoted. Propose the sparsity of every group for one
new candidate: your per-group changes are applied to the best allocation and rescaled so the weighted mean
stays exactly at the target, so move sparsity from costly groups into cheap ones, and repeat or amplify
moves that helped. Keep changes modest (a few points per group).
Answer with one JSON object only: {"ratios": {GROUP: SPARSITY, ...}, "rationale": "...", "reflection": "..."}."""

MAX_HISTORY = 8


def history_rows(ctx: "Context") -> list[dict[str, Any]]:
    rows = []
    for a in ctx.history[-MAX_HISTORY:]:
        row = {"iteration": a.index, "phase": a.phase, "level": a.step.get("level"), "verdict": a.verdict,
               "rise": a.metrics.get("rise"), "probe_kl": a.metrics.get("probe_kl"),
               "groups_pushed": a.extra.get("groups_pushed"), "reflection": a.reflection or a.error}
        rows.append({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items() if v is not None})
    return rows


class SparsifyPrompts:
    def schema(self, ctx: "Context", constrained: bool) -> dict[str, Any]:
        from ..sparsify.plan import MAX_RATIO

        groups = list(ctx.profile.groups)
        # every group required: a small constrained model must then write a number for each (no empty '{}');
        # short strings keep a local model's decode inside its token budget. A constrained decoder gets a 0.05
        # grid: free numbers let SmolLM2 write "0.000000" for each of 21 groups and run out of tokens (measured,
        # bench/results/llm_sparsity_evolve.json); the projector rescales the shape onto the level anyway.
        number: dict[str, Any] = ({"type": "number", "enum": [round(i * 0.05, 2) for i in range(1, round(MAX_RATIO / 0.05) + 1)]}
                                  if constrained else {"type": "number", "minimum": 0, "maximum": MAX_RATIO})
        return {
            "type": "object",
            "properties": {
                "ratios": {"type": "object", "additionalProperties": False, "required": groups,
                           "properties": {g: number for g in groups}},
                "rationale": {"type": "string", "maxLength": 160},
                "reflection": {"type": "string", "maxLength": 160},
            },
            "required": ["ratios", "rationale"],
            "additionalProperties": False,
        }

    def messages(self, ctx: "Context", schema: dict[str, Any]) -> list[Message]:
        if ctx.phase == "evolve":  # a slot of the evolve search (agents/evolve.py): the search state, not the ramp
            body = {"target_sparsity": round(ctx.step["target"], 4),
                    "best_groups": ctx.profile.group_table(ctx.step.get("current")),
                    "search": ctx.step.get("search", {})}
            user = ("Propose the sparsity of every group for the next candidate (weighted mean = target_sparsity).\n"
                    + json.dumps(body, separators=(",", ":"), default=str))
            return [Message("system", EVOLVE_SYSTEM), Message("user", user)]
        body = {
            "phase": ctx.phase,
            "target_sparsity": round(ctx.step["target"], 4),
            "this_step_level": round(ctx.step["level"], 4),
            "groups": ctx.profile.group_table(ctx.step.get("current")),
            "block_costs": ctx.profile.block_table(),
            "history": json.loads(json.dumps(history_rows(ctx), default=str)),
        }
        if ctx.priors:
            body["earlier_runs_on_a_matching_model"] = ctx.priors
        user = ("Propose the sparsity of every group for this step (weighted mean = this_step_level).\n"
                + json.dumps(body, separators=(",", ":")))
        return [Message("system", SYSTEM), Message("user", user)]

    def parse(self, reply: LLMReply, ctx: "Context") -> tuple[Plan | None, str | None, list[str]]:
        from ..sparsify.plan import MAX_RATIO

        data = reply.data if reply.data is not None else extract_json(reply.text)
        if not isinstance(data, dict):
            return None, "the reply was not a JSON object", []
        ratios = data.get("ratios")
        if not isinstance(ratios, dict) or not ratios:
            return None, "'ratios' must be a non-empty object mapping group ids to numbers", []
        groups = ctx.profile.groups
        problems = [f"unknown group '{k}'" for k in ratios if k not in groups]
        problems += [f"'{k}' must be a finite number" for k, v in ratios.items() if k in groups and (
            isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v))]
        extra = sorted(set(data) - {"ratios", "rationale", "reflection"})
        if extra:
            problems.append(f"unexpected keys {extra} (a sparsify plan has ratios, rationale, reflection)")
        if problems:
            return None, "; ".join(problems[:8]), []
        floor = ({r["group"]: r["sparsity"] for r in ctx.profile.group_table(ctx.step.get("current"))}
                 if ctx.phase == "ramp" else {})
        notes, clamped = [], {}
        for k, v in ratios.items():
            c = min(max(float(v), floor.get(k, 0.0)), MAX_RATIO)
            if c != v:
                notes.append(f"{k} {v} clamped to {c:.4f}")
            clamped[k] = c
        plan = Plan(ratios=clamped, default_ratio=ctx.step["level"], rationale=str(data.get("rationale", ""))[:2000],
                    reflection=str(data.get("reflection", ""))[:2000])
        return plan, None, notes

    def repair(self, messages: list[Message], reply_text: str, error: str, ctx: "Context") -> list[Message]:
        return [*messages, Message("assistant", (reply_text or "(empty reply)")[:4000]), Message("user", (
            f"Your answer could not be used: {error}. Valid group ids: {', '.join(ctx.profile.groups)}. "
            "Answer again with the JSON object only."))]

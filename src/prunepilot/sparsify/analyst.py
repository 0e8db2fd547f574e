"""LLM sparsity analyst: reads the sensitivity profile, the target and the history (rollbacks and
reflections included) and proposes per-group sparsity for the next level, through any LLMClient.

The reply is data: validated against the group ids (unknown names rejected), values clamped to
[current sparsity, MAX_RATIO]; one repair round; then the built-in fallback strategist decides and the
plan says why. In the refine phase (at the target) the loop keeps whichever measured allocation has the
lowest probe KL, so a weak proposal costs one probe and cannot make the result worse. Every call (prompt, reply, model, tokens, latency) goes to `record`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from ..agents.llm.base import LLMError, LLMReply, Message
from .plan import MAX_RATIO, SparsityPlan, plan_json_schema
from .strategies import SensitivityStrategist, StepContext, Strategist

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

MAX_HISTORY = 8


def build_messages(ctx: StepContext) -> list[Message]:
    table = ctx.profile.group_table(ctx.current)
    hist = [
        {k: (round(a[k], 5) if isinstance(a.get(k), float) else a.get(k))
         for k in ("iteration", "phase", "level", "verdict", "rise", "probe_kl", "groups_pushed", "reflection") if k in a}
        for a in ctx.history[-MAX_HISTORY:]
    ]
    body = {
        "phase": ctx.phase,
        "target_sparsity": round(ctx.target, 4),
        "this_step_level": round(ctx.level, 4),
        "groups": table,
        "block_costs": ctx.profile.block_table(),
        "history": json.loads(json.dumps(hist, default=str)),
    }
    user = ("Propose the sparsity of every group for this step (weighted mean = this_step_level).\n"
            + json.dumps(body, separators=(",", ":")))
    return [Message("system", SYSTEM), Message("user", user)]


def parse_reply(data: dict[str, Any] | None, ctx: StepContext) -> tuple[SparsityPlan | None, list[str]]:
    """Plan from a reply's JSON, or None with the problems to tell the model."""
    if not isinstance(data, dict):
        return None, ["the reply was not a JSON object"]
    ratios = data.get("ratios")
    if not isinstance(ratios, dict) or not ratios:
        return None, ["'ratios' must be a non-empty object mapping group ids to numbers"]
    groups = ctx.profile.groups
    problems = [f"unknown group '{k}'" for k in ratios if k not in groups]
    bad = [k for k, v in ratios.items() if k in groups and (isinstance(v, bool) or not isinstance(v, (int, float)))]
    problems += [f"'{k}' must be a number" for k in bad]
    if problems:
        return None, problems[:8]
    floor = {r["group"]: r["sparsity"] for r in ctx.profile.group_table(ctx.current)} if ctx.phase == "ramp" else {}
    clamped = {k: min(max(float(v), floor.get(k, 0.0)), MAX_RATIO) for k, v in ratios.items()}
    plan = SparsityPlan(ratios=clamped, default=ctx.level, rationale=str(data.get("rationale", ""))[:2000],
                        reflection=str(data.get("reflection", ""))[:2000])
    return plan, []


class LLMSparsityAnalyst:
    """Strategist backed by an LLMClient, with repair-once and a recorded fallback."""

    def __init__(
        self,
        client: Any,
        fallback: Strategist | None = None,
        record: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.client = client
        self.name = f"llm:{getattr(client, 'name', 'client')}"
        self.fallback = fallback or SensitivityStrategist()
        self.record = record
        self.fallbacks = 0

    def _call(self, messages: list[Message], schema: dict[str, Any], phase: str, ctx: StepContext) -> LLMReply:
        t0 = time.perf_counter()
        reply = self.client.complete(messages, schema)
        if self.record:
            self.record({
                "phase": phase, "level": ctx.level, "client": getattr(self.client, "name", "?"),
                "model": reply.model, "messages": [{"role": m.role, "content": m.content} for m in messages],
                "reply": reply.text, "data": reply.data, "input_tokens": reply.input_tokens,
                "output_tokens": reply.output_tokens, "latency_s": reply.latency_s or time.perf_counter() - t0,
            })
        return reply

    def propose(self, ctx: StepContext) -> SparsityPlan | None:
        schema = plan_json_schema(list(ctx.profile.groups))
        # every group required: a small constrained model must then write a number for each (no empty '{}');
        # short strings keep a local model's decode inside its token budget
        schema["properties"]["ratios"]["required"] = list(ctx.profile.groups)
        schema["properties"]["rationale"]["maxLength"] = 160
        schema["properties"]["reflection"] = {"type": "string", "maxLength": 160}
        messages = build_messages(ctx)
        try:
            reply = self._call(messages, schema, "propose", ctx)
            plan, problems = parse_reply(reply.data, ctx)
            if plan is None:
                repair = [*messages, Message("assistant", reply.text[:4000]), Message("user", (
                    "Your answer could not be used: " + "; ".join(problems)
                    + f". Valid group ids: {', '.join(ctx.profile.groups)}. Answer again with the JSON object only."))]
                reply = self._call(repair, schema, "repair", ctx)
                plan, problems = parse_reply(reply.data, ctx)
        except LLMError as exc:
            plan, problems = None, [f"the LLM backend failed: {exc}"]
        if plan is not None:
            plan.source = self.name
            return plan
        self.fallbacks += 1
        plan = self.fallback.propose(ctx)
        if plan is None:  # the fallback has nothing more to try in this phase
            return None
        plan.rationale = f"LLM answer unusable ({'; '.join(problems)}); {self.fallback.name} decided: {plan.rationale}"
        plan.source = f"{self.fallback.name} (fallback from {self.name})"
        return plan

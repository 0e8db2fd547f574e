"""LLMAnalyst: the one strategist that asks an LLM for a Plan (any job), validates it, repairs once, else
falls back. This module also holds the prune job's prompt kit; sparsify_prompts.py holds the sparsify one.

The reply is data, never code: JSON -> clamp ratios -> Plan.model_validate -> names checked. Everything the
analyst knows comes from the Context (profile, budget, history, step); it keeps no state between rounds,
so a resumed or replayed run asks exactly the same questions.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from string import Template
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ValidationError

from ..attempt import quality_of, score_name
from ..errors import PlanError
from ..plan import MAX_RATIO, Plan
from .llm.base import LLMClient, LLMError, LLMReply, Message
from .llm.parsing import extract_json, messages_hash, messages_to_dicts
from .llm.retry import redact

if TYPE_CHECKING:
    from .context import Context

SchemaMode = Literal["auto", "plan", "narrow"]
RATIO_GRID = [round(i * 0.05, 2) for i in range(round(MAX_RATIO / 0.05) + 1)]  # 0.0, 0.05, ..., 0.9
_MAX_NAMES_SHOWN = 60
_CELL = 140  # characters per history-table cell: long histories must still fit a small model's context


# ----------------------------------------------------------------------------------------------- profile names
@dataclass(frozen=True)
class Names:
    families: list[str]
    groups: list[str]
    layers: list[str] | None  # quantizable layers when the profile lists them
    blocks: list[str] | None = None  # skippable residual blocks when the profile lists them


def profile_names(profile: dict) -> Names:
    """Family, group and layer names from a compact profile (`prunepilot.profile.Profile.compact()`:
    families as [{"family", ...}], groups as [name]). Also accepts `families` as {name: info} or
    [{"name", "groups"|"members"}], and `groups` as [{"name", "family"}] or {name: info}."""
    families: list[str] = []
    groups: list[str] = []

    def add(seq: list[str], name: Any) -> None:
        if isinstance(name, str) and name and name not in seq:
            seq.append(name)

    fam = profile.get("families", {})
    fam_items = (
        fam.items() if isinstance(fam, dict)
        else (((f.get("name") or f.get("family")) if isinstance(f, dict) else f, f) for f in fam)
    )
    for name, info in fam_items:
        add(families, name)
        if isinstance(info, dict):
            members = info.get("groups", info.get("members", []))
            for g in members if isinstance(members, list) else []:  # prunepilot.profile gives a count here
                add(groups, g.get("name") if isinstance(g, dict) else g)
    grp = profile.get("groups", [])
    grp_items = grp.items() if isinstance(grp, dict) else ((g.get("name") if isinstance(g, dict) else g, g) for g in grp)
    for name, info in grp_items:
        add(groups, name)
        if isinstance(info, dict):
            add(families, info.get("family"))
    layers_raw = profile.get("layers")
    layers: list[str] | None = None
    if isinstance(layers_raw, dict):
        layers = [k for k in layers_raw if isinstance(k, str)]
    elif isinstance(layers_raw, list) and layers_raw:
        layers = [x for x in ((y.get("name") if isinstance(y, dict) else y) for y in layers_raw) if isinstance(x, str)]
    blocks_raw = profile.get("blocks")
    blocks = [x for x in ((b.get("block") if isinstance(b, dict) else b) for b in blocks_raw) if isinstance(x, str)] \
        if isinstance(blocks_raw, list) else None
    return Names(families, groups, layers, blocks)


# ----------------------------------------------------------------------------------------------------- schema
def narrow_schema(names: Names, *, rationale_chars: int = 160, required_limit: int = 12) -> dict[str, Any]:
    """A profile-specific sub-schema of the Plan for constrained decoders: every instance is a valid Plan
    whose names all exist. Ratios come from a 0.05 grid without 0 (a small model cannot emit 1.2 or
    0.3000001, nor an all-zero shape that the projector could not scale; 0.05 is near-protection)."""
    keys = names.families or names.groups[:32]
    ratio = {"type": "number", "enum": RATIO_GRID[1:]}
    ratios: dict[str, Any] = {
        "type": "object",
        "properties": {k: ratio for k in keys},
        "additionalProperties": False,
    }
    if len(keys) <= required_limit:
        ratios["required"] = list(keys)  # a small model then decides every family, instead of stopping early
    props: dict[str, Any] = {
        "rationale": {"type": "string", "maxLength": rationale_chars},
        "ratios": ratios,
        "importance": {"type": "string", "enum": ["l1", "l2", "taylor"]},
        "round_to": {"type": "integer", "enum": [1, 4, 8, 16]},
    }
    if names.blocks:
        props["skip"] = {"type": "array", "items": {"type": "string", "enum": list(names.blocks)}, "uniqueItems": True,
                         "maxItems": len(names.blocks)}
    required = ["rationale", "ratios", "importance", "round_to"]
    if len(keys) > required_limit:
        props["default_ratio"] = ratio
        required.append("default_ratio")
    return {"title": "Plan", "type": "object", "properties": props, "required": required, "additionalProperties": False}


def plan_schema() -> dict[str, Any]:
    return Plan.model_json_schema()


# ---------------------------------------------------------------------------------------------------- prompts
def _template(name: str) -> Template:
    return Template(resources.files("prunepilot.agents").joinpath("prompts", name).read_text(encoding="utf-8"))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def _cell(v: Any) -> str:
    s = _fmt(v).replace("|", "/").replace("\n", " ").strip()
    return s if len(s) <= _CELL else s[: _CELL - 1] + "…"


def _plan_summary(plan: Any) -> str:
    if plan is None:
        return "-"
    d = plan.model_dump() if isinstance(plan, Plan) else plan
    if not isinstance(d, dict):
        return _cell(d)
    parts = []
    if d.get("ratios"):
        parts.append(_fmt({k: round(float(v), 3) for k, v in d["ratios"].items() if isinstance(v, (int, float))}))
    if "scale" in d:
        parts.insert(0, f"scale={_fmt(d['scale'])}")
    for k in ("default_ratio", "importance", "round_to"):
        if d.get(k) is not None and k in d:
            parts.append(f"{k}={_fmt(d[k])}")
    if d.get("protected"):
        parts.append(f"protected={_fmt(d['protected'])}")
    return _cell("; ".join(parts) or "-")


def _family_of(group: str) -> str:
    """Same wildcarding as prunepilot.structure.family_of: layer1.0.conv1 -> layer1.*.conv1."""
    return ".".join("*" if seg.isdigit() else seg for seg in group.split("."))


def _projected_summary(a: dict, families: list[str]) -> str:
    """The projector's per-group ratios, averaged per family (a long group list would swamp the prompt)."""
    proj = a.get("projected_ratios")
    if not isinstance(proj, dict) or not proj:
        return _plan_summary(a.get("projected", a.get("projected_plan")))
    known = set(families)
    buckets: dict[str, list[float]] = {}
    for g, r in proj.items():
        if isinstance(r, (int, float)):
            fam = _family_of(g)
            buckets.setdefault(fam if fam in known else g, []).append(float(r))
    return _cell({k: round(sum(v) / len(v), 3) for k, v in buckets.items()})


def _accuracy(a: dict) -> Any:
    if a.get("accuracy") is not None:
        return a["accuracy"]
    m = a.get("metrics") or a.get("achieved") or {}
    return quality_of(m) if isinstance(m, dict) else None


def _achieved(a: dict) -> str:
    m = a.get("achieved", a.get("metrics")) or {}
    parts = []
    if isinstance(m, dict):
        parts += [f"{k}={_fmt(v)}" for k, v in m.items() if k != "accuracy" and isinstance(v, (int, float, str))]
    errs = a.get("errors")
    if isinstance(errs, dict) and errs:
        parts.append("error " + ", ".join(f"{k} {v:+.1%}" for k, v in errs.items() if isinstance(v, (int, float))))
    if a.get("within_band") is not None:
        parts.append("in band" if a["within_band"] else "OUT of band")
    return _cell("; ".join(parts)) if parts else "-"


def _auto_reflection(prev: dict | None, a: dict) -> str:
    """A factual one-liner computed from the records when the attempt carries no reflection of its own."""
    bits = []
    acc, prev_acc = _accuracy(a), _accuracy(prev) if prev else None
    if isinstance(acc, (int, float)):
        name = score_name(a.get("metrics") or a.get("achieved") or {}) if a.get("accuracy") is None else "accuracy"
        bits.append(f"{name} {acc:.4g}" + (f" ({acc - prev_acc:+.3g} vs previous)" if isinstance(prev_acc, (int, float)) else ""))
    if a.get("within_band") is not None:
        bits.append("landed in the band" if a["within_band"] else "missed the band")
    if a.get("fallback_reason"):
        bits.append("the built-in strategist answered because the LLM's plan was invalid")
    if a.get("error") or a.get("verdict") == "failed":
        bits.append(f"failed: {a.get('error', 'see journal')}")
    return "; ".join(bits)


def history_table(history: list[dict], *, max_rows: int = 8, families: list[str] | None = None) -> str:
    """A markdown table of the last `max_rows` attempts, then their rationales and reflections."""
    if not history:
        return "No attempts yet: this is the first round."
    families = families or []
    rows = history[-max_rows:]
    first = len(history) - len(rows)
    lines = []
    if first:
        lines.append(f"({first} earlier attempts not shown.)")
    lines += [
        "| # | plan (shape) | projected (per family) | achieved | accuracy | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for i, a in enumerate(rows, start=first):
        n = a.get("round", a.get("index", i))
        acc = _accuracy(a)
        lines.append(
            f"| {n} | {_plan_summary(a.get('plan'))} | {_projected_summary(a, families)} | {_achieved(a)} | "
            f"{_cell(acc) if acc is not None else '-'} | {_cell(a.get('verdict', '-'))} |"
        )
    notes = []
    for i, a in enumerate(rows, start=first):
        n = a.get("round", a.get("index", i))
        prev = history[i - 1] if i > 0 else None
        rationale = a.get("rationale")
        if not rationale and isinstance(a.get("plan"), dict):
            rationale = a["plan"].get("rationale")
        if rationale:
            notes.append(f"- #{n} rationale: {_cell(rationale)}")
        reflection = a.get("reflection") or _auto_reflection(prev, a)
        if reflection:
            notes.append(f"- #{n} reflection: {_cell(reflection)}")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def guidance_text(history: list[dict]) -> str:
    """The monitor's guidance attached to the latest attempt (deduplicated, in order)."""
    if not history:
        return "None."
    g = history[-1].get("guidance") or []
    items = [g] if isinstance(g, str) else list(g)
    seen: list[str] = []
    for x in items:
        if x and str(x) not in seen:
            seen.append(str(x))
    return "\n".join(f"- {x}" for x in seen) if seen else "None."


def _names_line(names: list[str]) -> str:
    if not names:
        return "(none listed)"
    shown = ", ".join(names[:_MAX_NAMES_SHOWN])
    return shown + (f", … ({len(names) - _MAX_NAMES_SHOWN} more)" if len(names) > _MAX_NAMES_SHOWN else "")


def display_schema(schema: Any) -> Any:
    """The schema as shown in the prompt: a ratio grid enum is shown as a range (far fewer tokens)."""
    if isinstance(schema, dict):
        enum = schema.get("enum")
        if schema.get("type") == "number" and isinstance(enum, list) and len(enum) > 6:
            return {"type": "number", "minimum": min(enum), "maximum": max(enum)}
        return {k: display_schema(v) for k, v in schema.items()}
    if isinstance(schema, list):
        return [display_schema(v) for v in schema]
    return schema


def profile_text(profile: dict) -> str:
    """The compact profile as the prompt shows it: scalars as one JSON line, families (and skippable blocks) as
    tables (about half the tokens of the JSON, and easier to compare row by row). Group names are listed under
    "Names"."""
    compact = dict(separators=(",", ":"), ensure_ascii=False, default=str)
    rest = {k: v for k, v in profile.items() if k not in ("families", "groups", "blocks")}
    lines = [json.dumps(rest, **compact)] if rest else []
    fam = profile.get("families") or []
    rows: list[dict[str, Any]] = []
    if isinstance(fam, dict):
        rows = [{"family": k, **(v if isinstance(v, dict) else {"value": v})} for k, v in fam.items()]
    else:
        rows = [({"family": f.get("family", f.get("name")), **{k: v for k, v in f.items() if k not in ("family", "name")}}
                 if isinstance(f, dict) else {"family": f}) for f in fam]
    lines += _table(rows)
    blocks = [b for b in profile.get("blocks") or [] if isinstance(b, dict)]
    if blocks:
        lines += ["", "Skippable residual blocks (\"skip\"):"] + _table(blocks)
    return "\n".join(lines)


def _table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]

    def cell(v: Any) -> str:
        if isinstance(v, list):
            return str(len(v)) if v and isinstance(v[0], (str, dict)) else "/".join(_fmt(x) for x in v)
        return _fmt(v).replace("|", "/")

    return ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + [
        "| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in rows]


def build_messages(profile: dict, budget: dict, history: list[dict], schema: dict[str, Any], *, max_rows: int = 8) -> list[Message]:
    names = profile_names(profile)
    compact = dict(separators=(",", ":"), ensure_ascii=False, default=str)
    system = _template("system.md").substitute(schema=json.dumps(display_schema(schema), **compact))
    user = _template("user.md").substitute(
        profile=profile_text(profile),
        budget=json.dumps(budget, **compact),
        families=_names_line(names.families),
        groups=_names_line(names.groups),
        n_attempts=len(history),
        history=history_table(history, max_rows=max_rows, families=names.families),
        guidance=guidance_text(history),
    )
    return [Message("system", system), Message("user", user)]


def repair_messages(messages: list[Message], reply_text: str, error: str) -> list[Message]:
    repair = _template("repair.md").substitute(error=error)
    return [*messages, Message("assistant", reply_text or "(empty reply)"), Message("user", repair)]


# ----------------------------------------------------------------------------------------------------- parse
def clamp_plan_data(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Clamp numeric ratios into [0, MAX_RATIO]; returns the new data and a note per clamp."""
    out = dict(data)
    notes: list[str] = []

    def clamp(label: str, v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
            return v  # leave it for validation to reject with a clear message
        c = float(min(max(v, 0.0), MAX_RATIO))  # compare before float(): a huge JSON int must not overflow
        if c != v:
            notes.append(f"{label} {str(v)[:24]} clamped to {c}")
        return c

    if isinstance(out.get("ratios"), dict):
        out["ratios"] = {k: clamp(f"ratio for '{k}'", v) for k, v in out["ratios"].items()}
    if "default_ratio" in out:
        out["default_ratio"] = clamp("default_ratio", out["default_ratio"])
    return out, notes


def _validation_summary(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors()[:6]:
        loc = ".".join(str(x) for x in e.get("loc", ())) or "(root)"
        parts.append(f"{loc}: {e.get('msg')}")
    return "the plan does not match the Plan schema: " + "; ".join(parts)


def parse_plan(reply: LLMReply, names: Names) -> tuple[Plan | None, str | None, list[str]]:
    """(plan, None, clamp notes) when valid, else (None, what is wrong, notes)."""
    data = reply.data if reply.data is not None else extract_json(reply.text)
    if data is None:
        return None, "the reply is not a JSON object (write only the JSON object, no prose)", []
    if not isinstance(data, dict):
        return None, f"the reply is JSON but not an object (got {type(data).__name__})", []
    if not any(k in data for k in ("ratios", "default_ratio", "quantize", "prune_heads", "skip")):
        return None, "the reply is an empty plan (no ratios, no default_ratio): give a ratio per family", []
    data, notes = clamp_plan_data(data)
    # pydantic would coerce true -> 1.0 and "0.95" -> 0.95, past the clamp: a ratio must be a JSON number
    ratios = data.get("ratios")
    typed = [(f"ratios.{k}", v) for k, v in ratios.items()] if isinstance(ratios, dict) else []
    typed += [("default_ratio", data["default_ratio"])] if "default_ratio" in data else []
    bad = [f"{loc}: must be a number between 0 and {MAX_RATIO}, got {type(v).__name__}"
           for loc, v in typed if isinstance(v, (bool, str))]
    if bad:
        return None, "the plan does not match the Plan schema: " + "; ".join(bad[:6]), notes
    try:
        plan = Plan.model_validate(data)
    except ValidationError as exc:
        return None, _validation_summary(exc), notes
    if not plan.quantize and not plan.prune_heads and not plan.skip and not any(plan.ratios.values()) and (
        plan.default_ratio == 0 or (names.families and set(names.families) <= set(plan.ratios))
    ):
        return None, "every ratio is 0, so the plan has no shape to scale onto the budget: give positive ratios", notes
    if names.groups or names.families:
        try:
            plan.check_names(names.groups, names.families, names.layers, names.blocks)
        except PlanError as exc:
            return None, str(exc), notes
    return plan, None, notes


# ---------------------------------------------------------------------------------------------------- analyst
def attempt_rows(ctx: "Context") -> list[dict[str, Any]]:
    """Attempts as the prune prompt's history table reads them; the monitor's guidance rides on the last."""
    rows = []
    for a in ctx.history:
        rows.append({"round": a.index, "plan": a.plan, "projected_ratios": a.projected,
                     "metrics": {k: v for k, v in a.metrics.items() if k in ("score", "accuracy", "macs", "params", "latency_ms")},
                     "errors": a.errors, "within_band": a.within_band, "verdict": a.verdict, "rationale": a.rationale,
                     "reflection": a.reflection or (f"failed: {a.error}" if a.error else ""),
                     "fallback_reason": a.fallback_reason})
    if rows:
        rows[-1]["guidance"] = ctx.step.get("guidance") or []
    return rows


class PrunePrompts:
    """The prune job's prompt: profile table, budget, names, history table, monitor guidance, prior runs."""

    def __init__(self, schema_mode: SchemaMode = "auto", max_history_rows: int = 8) -> None:
        self.schema_mode, self.max_history_rows = schema_mode, max_history_rows

    def schema(self, ctx: "Context", constrained: bool) -> dict[str, Any]:
        mode = self.schema_mode
        if mode == "auto":
            mode = "narrow" if constrained else "plan"
        return narrow_schema(profile_names(ctx.profile)) if mode == "narrow" else plan_schema()

    def messages(self, ctx: "Context", schema: dict[str, Any]) -> list[Message]:
        msgs = build_messages(ctx.profile, ctx.budget, attempt_rows(ctx), schema, max_rows=self.max_history_rows)
        if ctx.priors:
            msgs[1] = Message("user", msgs[1].content + "\n\n## Earlier runs on a matching model\n"
                              + json.dumps(ctx.priors, separators=(",", ":"), default=str))
        return msgs

    def parse(self, reply: LLMReply, ctx: "Context") -> tuple[Plan | None, str | None, list[str]]:
        return parse_plan(reply, profile_names(ctx.profile))

    def repair(self, messages: list[Message], reply_text: str, error: str, ctx: "Context") -> list[Message]:
        return repair_messages(messages, reply_text, error)


def prompt_kit(kind: str, **kw: Any) -> Any:
    if kind == "prune":
        return PrunePrompts(**kw)
    if kind == "sparsify":
        from .sparsify_prompts import SparsifyPrompts

        return SparsifyPrompts()
    raise PlanError("no LLM prompt template for this job kind", kind, "use a built-in strategist for it")


class LLMAnalyst:
    """The one LLM strategist for every job: the job kind picks the prompt template, schema and parser.

    Every call is recorded (redacted) into ctx.llm_calls for the journal; an invalid answer gets `repairs`
    repair requests; then `fallback` (any strategist) decides and ctx.fallback_reason says why."""

    kinds = ("prune", "sparsify")
    reads_blocks = True  # the prune prompt shows each skippable block's measured cost (jobs.prune.profile_blocks)

    def __init__(self, client: LLMClient, fallback: Any, *, repairs: int = 1, schema_mode: SchemaMode = "auto",
                 max_history_rows: int = 8) -> None:
        self.client, self.fallback, self.repairs = client, fallback, repairs
        self.schema_mode, self.max_history_rows = schema_mode, max_history_rows
        self.name = f"llm:{getattr(client, 'name', type(client).__name__)}"

    def propose(self, ctx: "Context") -> Plan | None:
        kit = prompt_kit(ctx.kind, **({"schema_mode": self.schema_mode, "max_history_rows": self.max_history_rows}
                                      if ctx.kind == "prune" else {}))
        schema = kit.schema(ctx, bool(getattr(self.client, "constrained", False)))
        messages = kit.messages(ctx, schema)
        error: str | None = ""
        for attempt in range(1 + max(0, self.repairs)):
            kind = "propose" if attempt == 0 else "repair"
            try:
                reply = self.client.complete(messages, schema)
            except LLMError as exc:
                ctx.llm_calls.append(_call_record(kind, messages, None, "error", str(exc), [], self.name))
                return self._fallback(ctx, f"the LLM call failed: {exc}")
            try:
                plan, error, notes = kit.parse(reply, ctx)
            except Exception as exc:  # a parser must never let odd data crash the run
                plan, error, notes = None, f"the reply could not be read: {type(exc).__name__}: {exc}", []
            ctx.llm_calls.append(_call_record(kind, messages, reply, "ok" if plan is not None else "invalid",
                                              error, notes, self.name))
            if plan is not None:
                return plan.model_copy(update={"source": self.name})
            messages = kit.repair(messages, reply.text, error or "invalid", ctx)
        return self._fallback(ctx, f"the LLM gave no valid plan in {1 + max(0, self.repairs)} tries; last error: {error}")

    def _fallback(self, ctx: "Context", reason: str) -> Plan | None:
        ctx.fallback_reason = redact(reason)[:600]
        plan = self.fallback.propose(ctx)
        if plan is None:  # the fallback has nothing more to try in this phase
            return None
        if not isinstance(plan, Plan):
            raise PlanError("a fallback strategist must return a Plan or None", type(plan).__name__,
                            "make the fallback's propose() return prunepilot.plan.Plan")
        fb = getattr(self.fallback, "name", type(self.fallback).__name__)
        return plan.model_copy(update={"source": f"{fb} (fallback from {self.name})",
                                       "rationale": f"LLM answer unusable; {fb} decided: {plan.rationale}"})


def _call_record(
    kind: str,
    messages: list[Message],
    reply: LLMReply | None,
    status: str,
    error: str | None,
    notes: list[str],
    client_name: str,
) -> dict[str, Any]:
    """One journal-ready record per LLM call; every string passes through redact()."""
    rec: dict[str, Any] = {
        "kind": kind,  # propose | repair
        "status": status,  # ok | invalid | error
        "client": client_name,
        "messages_hash": messages_hash(messages),
        "messages": [{"role": m["role"], "content": redact(m["content"])} for m in messages_to_dicts(messages)],
        "reply": redact(reply.text) if reply is not None else None,
        "data": _redact_json(reply.data) if reply is not None else None,
        "model": reply.model if reply is not None else None,
        "input_tokens": reply.input_tokens if reply is not None else 0,
        "output_tokens": reply.output_tokens if reply is not None else 0,
        "latency_s": round(reply.latency_s, 4) if reply is not None else 0.0,
        "error": redact(error) if error else None,
        "clamped": [redact(n) for n in notes],
        "meta": _redact_json(reply.meta) if reply is not None else {},
    }
    return rec


def _redact_json(obj: Any, depth: int = 0) -> Any:
    """redact() over every string (keys too) of a JSON-like value: a reply's parsed data can echo a key.
    Nesting past 16 levels (no plan has it) is cut, so junk data cannot overflow the stack or the journal."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, (dict, list, tuple)) and depth >= 16:
        return "[nested too deep]"
    if isinstance(obj, dict):
        return {(redact(k) if isinstance(k, str) else k): _redact_json(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_redact_json(v, depth + 1) for v in obj]
    return obj

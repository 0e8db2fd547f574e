"""One registry of strategists by name, for every job kind, with one `auto` rule.

auto = an LLM analyst when an API key is set (ANTHROPIC_API_KEY / OPENAI_API_KEY), else the built-in
`sensitivity` strategist. The in-process 135M model is an explicit choice (`--agent local`): measured on the
Fashion-MNIST bench it gives near-uniform plans and trails `sensitivity` (bench/results/agent_fashion_mnist*.json),
so auto never gives a user a worse run than the best built-in for the sake of showing an LLM."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import PrunepilotError
from .context import Strategist


def _prune(name: str) -> Callable[[], Strategist]:
    def make() -> Strategist:
        from . import strategists as s

        if name == "evolve":
            from .evolve_prune import PruneEvolveStrategist

            return PruneEvolveStrategist()
        return {"uniform": s.UniformStrategist, "grid": s.GridStrategist, "sensitivity": s.SensitivityStrategist,
                "optuna": s.OptunaStrategist, "blocks": s.BlockStrategist}[name]()
    return make


def _sparsify(name: str) -> Callable[[], Strategist]:
    def make() -> Strategist:
        from ..sparsify import strategies as s

        if name == "evolve":
            from .evolve import EvolveStrategist

            return EvolveStrategist()
        return {"uniform": s.UniformStrategist, "owl": s.OWLStrategist, "sensitivity": s.SensitivityStrategist}[name]()
    return make


# name -> job kind -> factory
BUILTINS: dict[str, dict[str, Callable[[], Strategist]]] = {
    "uniform": {"prune": _prune("uniform"), "sparsify": _sparsify("uniform")},
    "sensitivity": {"prune": _prune("sensitivity"), "sparsify": _sparsify("sensitivity")},
    "grid": {"prune": _prune("grid")},
    "optuna": {"prune": _prune("optuna")},
    "blocks": {"prune": _prune("blocks")},
    "owl": {"sparsify": _sparsify("owl")},
    "evolve": {"prune": _prune("evolve"), "sparsify": _sparsify("evolve")},
}
LLM_SPECS = "local, anthropic[:MODEL], openai[:MODEL], openai-compatible:MODEL"
STEERED = "evolve+"  # evolve+SPEC: the evolve search with every 4th offspring proposed by the LLM SPEC


def builtin_names(kind: str) -> list[str]:
    return [n for n, kinds in BUILTINS.items() if kind in kinds]


def make_builtin(name: str, kind: str) -> Strategist:
    if name not in BUILTINS or kind not in BUILTINS[name]:
        raise PrunepilotError(f"unknown built-in strategist for the {kind} job", name,
                              f"use one of {', '.join(builtin_names(kind))}, auto, or an LLM ({LLM_SPECS})")
    return BUILTINS[name][kind]()


def make_strategist(agent: str, kind: str, *, base_url: str | None = None, api_key: str | None = None,
                    transcripts: list | None = None, client: Any = None,
                    say: Callable[[str], None] | None = None) -> tuple[Strategist, str]:
    """(strategist, the name it resolved to). An LLM analyst falls back to the built-in `sensitivity`."""
    agent = agent.strip()
    if agent in BUILTINS:
        return make_builtin(agent, kind), agent
    if agent.startswith(STEERED):
        return _steered(agent[len(STEERED):], kind, base_url=base_url, api_key=api_key, transcripts=transcripts,
                        client=client)
    from .analyst import LLMAnalyst

    if client is not None:
        return LLMAnalyst(client, make_builtin("sensitivity", kind)), getattr(client, "name", "client")
    from .llm.factory import make_client, resolve_auto

    spec: str | None = agent
    if agent == "auto":
        spec = resolve_auto(local_ok=False)
        if spec is None:
            if say:
                say("agent auto: no ANTHROPIC_API_KEY / OPENAI_API_KEY set; using the built-in sensitivity strategist")
            return make_builtin("sensitivity", kind), "sensitivity"
    llm = make_client(spec, base_url=base_url, api_key=api_key, transcripts=transcripts)
    return LLMAnalyst(llm, make_builtin("sensitivity", kind)), spec


def _steered(spec: str, kind: str, *, base_url: str | None, api_key: str | None, transcripts: list | None,
             client: Any) -> tuple[Strategist, str]:
    """evolve steered by an LLM: `client` (tests, benches) or the client SPEC names."""
    if "evolve" not in BUILTINS or kind not in BUILTINS["evolve"]:
        raise PrunepilotError(f"the evolve search has no {kind} job yet", f"{STEERED}{spec}",
                              f"use one of {', '.join(builtin_names(kind))}, auto, or an LLM ({LLM_SPECS})")
    if client is None:
        if not spec.strip():
            raise PrunepilotError("evolve+ needs an LLM after the plus", STEERED, f"e.g. --agent evolve+local ({LLM_SPECS})")
        from .llm.factory import make_client

        client = make_client(spec.strip(), base_url=base_url, api_key=api_key, transcripts=transcripts)
    if kind == "prune":
        from .evolve_prune import PruneEvolveStrategist

        s: Any = PruneEvolveStrategist(client=client)
    else:
        from .evolve import EvolveStrategist

        s = EvolveStrategist(client=client)
    return s, s.name

"""The real SmolLM2-135M through a very short sparsify loop (few tokens, short sequences)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest


@pytest.mark.slow
def test_smollm2_short_loop_reaches_exact_sparsity(tmp_path: Path) -> None:
    from prunepilot.sparsify.run import SparsifyConfig, run_sparsify

    cfg = SparsifyConfig(model="smollm2", sparsity="30%", method="wanda", agent="sensitivity",
                         calib_seqs=2, calib_seqlen=64, eval_seqs=2, eval_seqlen=128, probe_seqs=1,
                         probe_seqlen=64, grad_seqs=1, fidelity_seqs=1, step=0.15, bands=1, refine_iters=2, export=False)
    res = run_sparsify(cfg, tmp_path, say=lambda s: None)
    assert res["within_band"] and abs(res["compressed"]["sparsity"] - 0.3) < 1e-4
    assert math.isfinite(res["compressed"]["perplexity"])
    assert res["compressed"]["perplexity"] >= res["dense"]["perplexity"] * 0.9
    assert res["loop"]["iterations"] >= 2
    from prunepilot.journal import Journal

    rows = Journal(tmp_path / "journal.sqlite").attempts(res["run_id"])
    assert [a.index for a in rows] == list(range(len(rows)))
    ramp = [a for a in rows if a.phase == "ramp"]
    assert ramp and ramp[-1].verdict in ("accept", "forced", "rollback")
    assert {a.phase for a in rows} >= {"ramp", "refine"}  # a short loop still refines at the target
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert len(plan["layers"]) == 210

"""Learning across runs: does a second run at a neighbouring budget reach the first run's quality sooner
when it may read the history store?

    python bench/history_warm_start.py --out bench/results/history_warm_start.json

1. run A at --first (default 50% MACs) into a fresh history store;
2. run B at --second (default 45%) with that store (warm start from A's best shape);
3. run C at --second with no history (cold).
Each run uses the same small settings and the built-in sensitivity strategist. Reported per run: in-loop
accuracy of every attempt, and the attempts needed to reach `level` = (A's best in-loop accuracy - margin).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = str(Path(sys.executable).parent / "prunepilot")


def run(target: str, out: Path, args: argparse.Namespace, history: Path | None) -> dict:
    cmd = [BIN, "prune", "prunepilot:fmnist_resnet20", "--data", "fashion-mnist", "--target-macs", target,
           "--rounds", str(args.rounds), "--finetune-steps", str(args.finetune_steps), "--eval-limit", str(args.eval_limit),
           "--finetune-epochs", "0", "--agent", args.agent, "--out", str(out)]
    cmd += ["--history", str(history)] if history else ["--no-history"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"run failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    with sqlite3.connect(out / "journal.sqlite") as c:
        rows = [json.loads(x[0]) for x in c.execute("SELECT data FROM attempts ORDER BY round")]
    accs = [a["score"] if a["within_band"] and a["verdict"] not in ("failed",) else None for a in rows]
    return {"target": target, "history": bool(history), "accuracies": accs,
            "strategists": [a["strategist"] for a in rows], "best": max((a for a in accs if a is not None), default=None),
            "seconds": round(time.perf_counter() - t0, 1)}


def rounds_to(accs: list[float | None], level: float) -> int | None:
    for i, a in enumerate(accs):
        if a is not None and a >= level:
            return i + 1
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--first", default="50%")
    ap.add_argument("--second", default="45%")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--finetune-steps", type=int, default=20)
    ap.add_argument("--eval-limit", type=int, default=1000)
    ap.add_argument("--agent", default="sensitivity")
    ap.add_argument("--margin", type=float, default=0.005, help="quality level = first run's best - margin")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "history_warm_start.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        store = tmp / "history.sqlite"
        a = run(args.first, tmp / "a", args, store)
        b = run(args.second, tmp / "b", args, store)
        c = run(args.second, tmp / "c", args, None)
    level = a["best"] - args.margin
    res = {"settings": vars(args) | {"out": str(args.out)}, "level": level, "first": a, "warm": b, "cold": c,
           "rounds_to_level": {"warm": rounds_to(b["accuracies"], level), "cold": rounds_to(c["accuracies"], level)}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res["rounds_to_level"]), "level", round(level, 4))
    print("warm", b["accuracies"], "\ncold", c["accuracies"])


if __name__ == "__main__":
    main()

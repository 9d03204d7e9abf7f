"""Which XGBoost settings resume bitwise: measured, one setting per row (docs/guides/xgboost.md
has the table this prints).

    python bench/xgboost_resume.py            # ~3-5 min on 2 loaded cores

For each setting and for ``reseed_each_round`` off and on, three fresh processes train with
``spotckpt.integrations.xgboost.train`` (2,000 rows, 12 features, 40 rounds, a checkpoint
every 5 rounds, local dir only): an uninterrupted run; a run that SIGTERMs itself after round
17 (it saves at the next round boundary and exits 143); and a restart that resumes from that
checkpoint. A row says how many of the trees trained after the resume differ from the
uninterrupted run's (with stats), and whether the final models' UBJSON bytes are equal.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROUNDS, KILL_AFTER = 40, 17
BASE = {"objective": "binary:logistic", "max_depth": 4, "nthread": 1, "seed": 0}
SETTINGS: list[dict] = [
    {"tree_method": "hist"},
    {"tree_method": "hist", "subsample": 0.8},
    {"tree_method": "hist", "colsample_bytree": 0.8},
    {"tree_method": "hist", "colsample_bylevel": 0.8},
    {"tree_method": "hist", "colsample_bynode": 0.8},
    {"tree_method": "hist", "subsample": 0.7, "colsample_bytree": 0.8, "colsample_bylevel": 0.8,
     "colsample_bynode": 0.8, "seed": 7},
    {"tree_method": "hist", "subsample": 0.7, "colsample_bynode": 0.8, "nthread": 2},
    {"tree_method": "hist", "subsample": 0.7, "colsample_bynode": 0.7, "num_parallel_tree": 3},
    {"tree_method": "approx"},
    {"tree_method": "approx", "subsample": 0.8},
    {"tree_method": "approx", "colsample_bytree": 0.8, "colsample_bylevel": 0.8, "colsample_bynode": 0.8},
    {"tree_method": "exact"},
    {"tree_method": "exact", "subsample": 0.8},
    {"tree_method": "exact", "colsample_bytree": 0.8, "colsample_bylevel": 0.8},
]


def worker(params: dict, reseed: bool, local: str, out: str | None, kill_after: int | None) -> None:
    import numpy as np
    import xgboost as xgb

    from spotckpt.integrations.xgboost import SpotCheckpoint, train

    class KillAfter(xgb.callback.TrainingCallback):
        def after_iteration(self, model: xgb.Booster, epoch: int, evals_log: dict) -> bool:
            if kill_after is not None and model.num_boosted_rounds() == kill_after:
                os.kill(os.getpid(), signal.SIGTERM)  # a spot notice; the save follows
            return False

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 12))
    y = (x[:, 0] - 2 * x[:, 1] * x[:, 2] + np.sin(3 * x[:, 3]) + rng.normal(size=2000) > 0).astype(np.float32)
    bst = train(dict(BASE, **params), xgb.DMatrix(x, label=y), ROUNDS, verbose_eval=False,
                callbacks=[SpotCheckpoint(every_n_rounds=5, local_dir=local, remote=None,
                                          reseed_each_round=reseed), KillAfter()])
    if out:
        Path(out).write_text(json.dumps({"dump": bst.get_dump(with_stats=True),
                                         "raw": bytes(bst.save_raw("ubj")).hex()}))


def run(params: dict, reseed: bool, tmp: Path) -> tuple[int, bool]:
    def go(name: str, local: str, kill: bool, expect: int) -> dict | None:
        out = tmp / f"{name}.json"
        cmd = [sys.executable, __file__, "--worker", json.dumps([params, reseed, local, str(out) if not kill else None,
                                                                  KILL_AFTER if kill else None])]
        p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, SPOTCKPT_METADATA_INTERVAL="3600"))
        assert p.returncode == expect, (name, p.returncode, p.stderr[-2000:])
        return None if kill else json.loads(out.read_text())

    ref = go("ref", str(tmp / "ref"), False, 0)
    go("killed", str(tmp / "job"), True, 143)
    res = go("resumed", str(tmp / "job"), False, 0)
    assert ref is not None and res is not None and len(ref["dump"]) == len(res["dump"])
    return sum(a != b for a, b in zip(ref["dump"], res["dump"])), ref["raw"] == res["raw"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker")
    args = ap.parse_args()
    if args.worker:
        worker(*json.loads(args.worker))
        return
    import xgboost

    print(f"xgboost {xgboost.__version__}, {ROUNDS} rounds, SIGTERM after round {KILL_AFTER}; "
          f"base params {BASE}\n")
    print("| setting | reseed_each_round=False | reseed_each_round=True |\n|---|---|---|")
    for s in SETTINGS:
        cells = []
        for reseed in (False, True):
            with tempfile.TemporaryDirectory() as d:
                differ, same = run(s, reseed, Path(d))
            cells.append(("**bitwise**" if same and not differ else f"no: {differ} trees differ")
                          + ("" if same or differ else " (bytes differ)"))
        print(f"| `{json.dumps(s)[1:-1]}` | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()

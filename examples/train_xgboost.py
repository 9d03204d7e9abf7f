"""XGBoost training that survives spot interruptions: a drop-in ``train`` and one callback.

Binary classification on synthetic data with a validation set and early stopping.
Deterministic parameters by default (no subsampling, one thread), so a run that is
interrupted and resumed ends with exactly the model, evaluation history and best iteration
of an uninterrupted one. With row/column subsampling (``--subsample``, ``--colsample``), add
``--reseed-each-round`` (``SpotCheckpoint(reseed_each_round=True)``) for the same guarantee.
No torch needed.

    SPOTCKPT_REMOTE=s3://bucket/run1/ python examples/train_xgboost.py --rounds 200

Run the same command again after an interruption (on a new machine, with an empty local
dir): training continues from the newest checkpoint and runs only the remaining rounds.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time

import numpy as np
import xgboost as xgb

from spotckpt.integrations.xgboost import SpotCheckpoint, train


def make_data(n: int = 4000, dim: int = 12, seed: int = 0) -> tuple[xgb.DMatrix, xgb.DMatrix]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim))
    logit = x[:, 0] - 2 * x[:, 1] * x[:, 2] + np.sin(3 * x[:, 3]) + rng.normal(scale=1.0, size=n)
    y = (logit > 0).astype(np.float32)
    cut = n * 3 // 4
    return xgb.DMatrix(x[:cut], label=y[:cut]), xgb.DMatrix(x[cut:], label=y[cut:])


class Progress(xgb.callback.TrainingCallback):
    """Says where training starts and (optionally) slows each round down, for demos and tests."""

    def __init__(self, sleep: float) -> None:
        super().__init__()
        self.sleep = sleep

    def before_training(self, model: xgb.Booster) -> xgb.Booster:
        done = model.num_boosted_rounds()
        print(f"resumed at round {done}" if done else "fresh start at round 0", flush=True)
        return model

    def after_iteration(self, model: xgb.Booster, epoch: int, evals_log: dict) -> bool:
        if self.sleep:
            time.sleep(self.sleep)
        return False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--every-rounds", type=int, default=10)
    ap.add_argument("--early-stopping", type=int, default=15)
    ap.add_argument("--subsample", type=float, default=1.0, help="row subsampling ratio")
    ap.add_argument("--colsample", type=float, default=1.0, help="colsample_bytree and colsample_bynode")
    ap.add_argument("--reseed-each-round", action="store_true", help="exact resumes with subsampling")
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds per round, to make runs interruptible")
    ap.add_argument("--out", default=None, help="write the model dump, history and best iteration here (JSON)")
    args = ap.parse_args()

    dtrain, dvalid = make_data()
    params = {"objective": "binary:logistic", "eval_metric": ["error", "logloss"], "tree_method": "hist",
              "max_depth": 5, "eta": 0.3, "nthread": 1, "seed": 0, "subsample": args.subsample,
              "colsample_bytree": args.colsample, "colsample_bynode": args.colsample}
    history: dict = {}
    booster = train(params, dtrain, num_boost_round=args.rounds, evals=[(dtrain, "train"), (dvalid, "valid")],
                    early_stopping_rounds=args.early_stopping, evals_result=history, verbose_eval=False,
                    callbacks=[SpotCheckpoint(every_n_rounds=args.every_rounds,
                                              reseed_each_round=args.reseed_each_round),
                               Progress(args.sleep)])
    print(f"finished: {booster.num_boosted_rounds()} rounds, best iteration {booster.best_iteration}, "
          f"valid logloss {history['valid']['logloss'][booster.best_iteration]:.5f}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"dump": booster.get_dump(with_stats=True), "history": history,
                       "best_iteration": booster.best_iteration, "best_score": booster.best_score,
                       "model_sha256": hashlib.sha256(booster.save_raw("ubj")).hexdigest()}, f)


if __name__ == "__main__":
    main()

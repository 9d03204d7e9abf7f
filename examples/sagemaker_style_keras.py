"""An unmodified SageMaker spot-training script for Keras: ``ModelCheckpoint`` per epoch.

It knows nothing about spotckpt: ``ModelCheckpoint`` writes ``model-epoch-NNN.keras`` into
the checkpoint dir after every epoch, and at start the script loads the newest such file
and continues with ``initial_epoch``. Under ``spotckpt run`` every file is mirrored to the
remote once written and closed, and pulled back into an empty dir on restart:

    KERAS_BACKEND=torch spotckpt run --remote s3://bucket/job/ -- \\
        python examples/sagemaker_style_keras.py --checkpoint-dir /opt/ml/checkpoints
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402


def newest_checkpoint(ckpt_dir: str) -> tuple[str | None, int]:
    best, epoch = None, 0
    for f in glob.glob(os.path.join(ckpt_dir, "model-epoch-*.keras")):
        m = re.search(r"model-epoch-(\d+)\.keras$", f)
        if m and int(m.group(1)) > epoch:
            best, epoch = f, int(m.group(1))
    return best, epoch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint-dir", default="/opt/ml/checkpoints")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds per epoch, to make runs interruptible")
    ap.add_argument("--out", default=None, help="write the final weights here (.weights.h5)")
    args = ap.parse_args()

    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:
        pass
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(1234)
    x = rng.normal(size=(256, 8)).astype("float32")
    y = (x @ rng.normal(size=(8, 1)) + 0.1 * rng.normal(size=(256, 1))).astype("float32")

    path, initial_epoch = newest_checkpoint(args.checkpoint_dir)
    if path:
        model = keras.models.load_model(path)
        print(f"resumed from {os.path.basename(path)} at epoch {initial_epoch}", flush=True)
    else:
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                                  keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
        print("no checkpoint: starting at epoch 0", flush=True)

    os.makedirs(args.checkpoint_dir, exist_ok=True)
    callbacks = [keras.callbacks.ModelCheckpoint(os.path.join(args.checkpoint_dir, "model-epoch-{epoch:03d}.keras"))]
    if args.sleep:
        callbacks.insert(0, keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: time.sleep(args.sleep)))
    model.fit(x, y, batch_size=32, epochs=args.epochs, initial_epoch=initial_epoch, shuffle=False,
              callbacks=callbacks, verbose=0)
    for f in sorted(glob.glob(os.path.join(args.checkpoint_dir, "model-epoch-*.keras")))[-1:]:
        print(f"last checkpoint {os.path.basename(f)}", flush=True)
    if args.out:
        model.save_weights(args.out)
    print("done", flush=True)


if __name__ == "__main__":
    main()

"""Keras 3 ``model.fit`` that survives spot interruptions with one callback.

A small MLP (dropout and batch normalisation, so seed-generator states and moving
statistics matter) with Adam on a decaying learning rate, on shuffled numpy arrays with a
validation set. Run with any Keras backend (tested with torch, jax and tensorflow):

    KERAS_BACKEND=jax SPOTCKPT_REMOTE=s3://bucket/run1/ python examples/train_keras.py --epochs 6

Run the same command again after an interruption (on a new machine, with an empty local
dir): ``fit`` continues in the interrupted epoch at the next batch, and the final weights are
those of an uninterrupted run. Run it once more after it finished: nothing is trained.
"""
from __future__ import annotations

import argparse
import time

import keras
import numpy as np

from spotckpt.integrations.keras import SpotCheckpoint


def make_data(n: int = 1536, dim: int = 16) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1234)
    x = rng.normal(size=(n, dim)).astype("float32")
    w = rng.normal(size=(dim, 1)).astype("float32")
    return x, (np.tanh(x @ w) + 0.1 * rng.normal(size=(n, 1))).astype("float32")


def make_model() -> keras.Model:
    model = keras.Sequential([
        keras.Input((16,)),
        keras.layers.Dense(32, activation="relu"),
        keras.layers.Dropout(0.1),
        keras.layers.BatchNormalization(),
        keras.layers.Dense(1),
    ])
    lr = keras.optimizers.schedules.ExponentialDecay(1e-2, decay_steps=50, decay_rate=0.7)
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="mse", metrics=["mae"])
    return model


class Progress(keras.callbacks.Callback):
    """Says where training starts and (optionally) slows each batch down, for demos and tests."""

    def __init__(self, spot: SpotCheckpoint, sleep: float) -> None:
        super().__init__()
        self.spot, self.sleep = spot, sleep

    def on_train_begin(self, logs=None) -> None:
        step = self.spot.checkpointer.restored_step  # the SpotCheckpoint runs first
        print(f"resumed at step {step}" if step is not None else "fresh start at step 0", flush=True)

    def on_train_batch_end(self, batch, logs=None) -> None:
        if self.sleep:
            time.sleep(self.sleep)

    def on_epoch_end(self, epoch, logs=None) -> None:
        print(f"epoch {epoch} loss {logs['loss']:.5f} val_loss {logs['val_loss']:.5f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--every-batches", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds per batch, to make runs interruptible")
    ap.add_argument("--out", default=None, help="write the final weights here (.npz)")
    args = ap.parse_args()

    if keras.backend.backend() == "torch":
        import torch

        torch.set_num_threads(1)  # bitwise reproducibility across runs
    keras.utils.set_random_seed(0)
    x, y = make_data()
    model = make_model()
    spot = SpotCheckpoint(every_n_batches=args.every_batches)
    model.fit(x[:1280], y[:1280], validation_data=(x[1280:], y[1280:]), epochs=args.epochs,
              batch_size=args.batch_size, shuffle=True, verbose=0, callbacks=[spot, Progress(spot, args.sleep)])
    print("finished", flush=True)
    if args.out:
        np.savez(args.out, *model.get_weights())


if __name__ == "__main__":
    main()

"""Which Keras ``fit`` settings resume bitwise, per backend: the measurements behind the table in
docs/guides/keras.md.

    .venv/bin/python bench/keras_exactness.py [--backends torch,jax,tensorflow] [--settings arrays,...]

For each backend and input setting: one uninterrupted run; one run SIGTERMed mid-epoch and one
SIGTERMed at an epoch's end (each while it waits after a chosen batch, so the place does not
depend on load), each resumed in a new process from the local dir; the final weights are
compared with the uninterrupted run's. All runs seed with ``keras.utils.set_random_seed(0)``. Prints one line per case. A small MLP with dropout and
batch normalisation, 256 samples in batches of 32, 3 epochs, a save every 5 batches.

Run as a script, each case runs this file again with ``--train`` in a subprocess.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile

SETTINGS = {
    # name: (backends it applies to, description)
    "arrays": ("torch,jax,tensorflow", "numpy arrays, shuffle=True"),
    "arrays-noshuffle": ("torch,jax,tensorflow", "numpy arrays, shuffle=False"),
    "arrays-batchshuffle": ("torch,jax,tensorflow", 'numpy arrays, shuffle="batch"'),
    "steps-per-execution": ("jax,tensorflow", "numpy arrays, shuffle=True, steps_per_execution=4"),
    "pydataset": ("torch,jax,tensorflow", "keras.utils.PyDataset, shuffle=True"),
    "torch-dataloader": ("torch", "torch DataLoader(shuffle=True)"),
    "tf-data-seeded": ("tensorflow", "tf.data.Dataset.shuffle(seed=1)"),
    "tf-data": ("tensorflow", "tf.data.Dataset.shuffle() (no op seed)"),
    "tf-data-noshuffle": ("tensorflow", "tf.data.Dataset, not shuffled"),
}
N, BATCH, EPOCHS, EVERY = 256, 32, 3, 5
STEPS = N // BATCH


def train(setting: str, pause_at: int | None, out: str | None) -> None:
    import keras
    import numpy as np

    from spotckpt.integrations.keras import SpotCheckpoint

    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        torch.set_num_threads(1)
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(1234)
    x = rng.normal(size=(N, 8)).astype("float32")
    y = (np.tanh(x @ rng.normal(size=(8, 1))) + 0.1 * rng.normal(size=(N, 1))).astype("float32")
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dropout(0.2), keras.layers.BatchNormalization(),
                              keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse",
                  steps_per_execution=4 if setting == "steps-per-execution" else 1)
    kw: dict = {"batch_size": BATCH, "shuffle": True}
    data: object = None
    if setting == "arrays-noshuffle":
        kw["shuffle"] = False
    elif setting == "arrays-batchshuffle":
        kw["shuffle"] = "batch"
    elif setting == "pydataset":
        class Batches(keras.utils.PyDataset):
            def __len__(self) -> int:
                return STEPS

            def __getitem__(self, i: int):
                return x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH]

        data, kw = Batches(), {"shuffle": True}
    elif setting == "torch-dataloader":
        import torch
        from torch.utils.data import DataLoader, TensorDataset

        data, kw = DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=BATCH,
                              shuffle=True), {}
    elif setting.startswith("tf-data"):
        import tensorflow as tf

        ds = tf.data.Dataset.from_tensor_slices((x, y))
        if setting != "tf-data-noshuffle":
            ds = ds.shuffle(N, seed=1 if setting == "tf-data-seeded" else None)
        data, kw = ds.batch(BATCH), {}

    class Pause(keras.callbacks.Callback):
        epoch, paused = 0, False

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_begin(self, batch, logs=None):  # (batch: the first of an execution's)
            if pause_at is not None and not self.paused and self.epoch * STEPS + batch >= pause_at:
                self.paused = True
                print(f"paused at {pause_at}", flush=True)
                sys.stdin.readline()

    spot = SpotCheckpoint(every_n_batches=EVERY)
    args = (data,) if data is not None else (x, y)
    model.fit(*args, epochs=EPOCHS, verbose=0, callbacks=[spot, Pause()], **kw)
    if out:
        np.savez(out, *model.get_weights())


def run(backend: str, setting: str, local: str, *, pause_at: int | None = None, out: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOTCKPT_")}
    env.update(KERAS_BACKEND=backend, SPOTCKPT_LOCAL_DIR=local, SPOTCKPT_METADATA_INTERVAL="3600",
               PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3")
    argv = [sys.executable, __file__, "--train", setting] + (["--pause-at", str(pause_at)] if pause_at else []) \
        + (["--out", out] if out else [])
    p = subprocess.Popen(argv, env={**env, "SPOTCKPT_REMOTE": ""}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    head = ""
    if pause_at:
        assert p.stdout is not None and p.stdin is not None
        for line in p.stdout:
            head += line
            if line.startswith("paused at"):
                p.send_signal(signal.SIGTERM)
                p.stdin.write("\n")
                p.stdin.flush()
                break
    out_text, _ = p.communicate(timeout=600)
    expected = 143 if pause_at else 0
    if p.returncode != expected:
        raise RuntimeError(f"{argv} exited {p.returncode}\n{head + out_text}")
    return head + out_text


def weights(path: str) -> list:
    import numpy as np

    with np.load(path) as f:
        return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


def case(backend: str, setting: str, tmp: str) -> str:
    import numpy as np

    run(backend, setting, f"{tmp}/ref", out=f"{tmp}/ref.npz")
    ref = weights(f"{tmp}/ref.npz")
    results = []
    spe = 4 if setting == "steps-per-execution" else 1
    # SIGTERM before the batch (or execution) that begins at this global index: the save
    # comes after it, mid-epoch in the first case, at the end of epoch 1 in the second
    for name, pause in (("mid-epoch", STEPS), ("epoch end", 2 * STEPS - spe)):
        local = f"{tmp}/{name}"
        run(backend, setting, local, pause_at=pause)
        run(backend, setting, local, out=f"{tmp}/{name}.npz")
        got = weights(f"{tmp}/{name}.npz")
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(ref, got))
        results.append(f"{name}: {'bitwise' if diff == 0 else f'max abs diff {diff:.3g}'}")
    return "; ".join(results)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train")
    ap.add_argument("--pause-at", type=int)
    ap.add_argument("--out")
    ap.add_argument("--backends", default="torch,jax,tensorflow")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    args = ap.parse_args()
    if args.train:
        train(args.train, args.pause_at, args.out)
        return
    for backend in args.backends.split(","):
        for setting in args.settings.split(","):
            if backend not in SETTINGS[setting][0].split(","):
                continue
            tmp = tempfile.mkdtemp(prefix="keras-exact-")
            try:
                print(f"{backend:10} {SETTINGS[setting][1]:60} {case(backend, setting, tmp)}", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"{backend:10} {SETTINGS[setting][1]:60} FAILED: {str(e)[-2000:]}", flush=True)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Each framework callback with ``every="auto"``: refused together with the callback's own
step cadence at construction, then a tiny training run with it.

    python auto_callbacks.py FRAMEWORK LOCAL_DIR

Prints ``refused: <the error>`` and ``trained`` (the schedule itself is read from the
state dir by the test).
"""
from __future__ import annotations

import sys

framework, local = sys.argv[1], sys.argv[2]
AUTO = dict(every="auto", min_interval=0.05, max_interval=0.2, local_dir=local, remote=None)
STEPS = {"lightning": "every_n_steps", "keras": "every_n_batches", "xgboost": "every_n_rounds",
         "transformers": "every_n_steps"}

mod = __import__(f"spotckpt.integrations.{framework}", fromlist=["SpotCheckpoint"])
try:
    mod.SpotCheckpoint(**{STEPS[framework]: 5}, every="auto")
    print("NOT refused")
except ValueError as e:
    print(f"refused: {type(e).__name__}: {e}", flush=True)

if framework == "lightning":
    import lightning as L
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    class M(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(4, 1)

        def training_step(self, batch, i):
            import time
            time.sleep(0.01)
            return torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = DataLoader(TensorDataset(torch.randn(256, 4), torch.randn(256, 1)), batch_size=8)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", callbacks=[mod.SpotCheckpoint(**AUTO)])
    trainer.fit(M(), data)
elif framework == "keras":
    import time

    import keras
    import numpy as np

    class Slow(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            time.sleep(0.01)

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    model.fit(np.random.rand(256, 4), np.random.rand(256, 1), batch_size=8, epochs=1, verbose=0,
              callbacks=[mod.SpotCheckpoint(**AUTO), Slow()])
elif framework == "xgboost":
    import time

    import numpy as np
    import xgboost as xgb

    class Slow(xgb.callback.TrainingCallback):
        def after_iteration(self, model, epoch, evals_log):
            time.sleep(0.01)
            return False

    dtrain = xgb.DMatrix(np.random.rand(200, 4), label=np.random.rand(200))
    mod.train({"max_depth": 2}, dtrain, num_boost_round=40, callbacks=[mod.SpotCheckpoint(**AUTO), Slow()])
elif framework == "transformers":
    import time

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            ids = torch.randint(0, 50, (8,), generator=g)
            return {"input_ids": ids, "labels": ids}

    class Slow(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            time.sleep(0.01)

    spot = mod.SpotCheckpoint(**AUTO)
    targs = TrainingArguments(output_dir=local + "-out", max_steps=16, report_to=[], use_cpu=True, seed=0,
                              per_device_train_batch_size=4, disable_tqdm=True, save_strategy="no")
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0,
                        eos_token_id=0)
    trainer = Trainer(model=GPT2LMHeadModel(config), args=targs, train_dataset=Tokens(), callbacks=[spot, Slow()])
    trainer.train(resume_from_checkpoint=spot.resume_path())
print("trained", flush=True)

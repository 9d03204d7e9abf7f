"""examples/train_keras.py with a callback (after the SpotCheckpoint, as a user's would be) that
prints what it sees, and an optional pause for the test to send its SIGTERM.

    KERAS_BACKEND=jax python keras_recorded.py [--pause-at STEP] <train_keras.py arguments>

SPOTCKPT_TEST_NO_FAST_FORWARD=1: act as if fit's epoch iterator could not be found.

Prints ``seen epoch E``, ``seen batch E B`` (at on_train_batch_end; ``begin`` lines too) and
``seen validation`` (the validation data is fetched). With --pause-at STEP, after the
STEP-th batch of the job (counted from its first run) it prints ``paused at STEP`` and
waits for a line on stdin: the test signals the process while it waits, so where the signal
lands does not depend on the machine's load.
"""
import os
import sys

if os.environ.get("KERAS_BACKEND") != "tensorflow":
    # keras.utils.set_random_seed imports TensorFlow whenever it is installed, only to seed it
    # (~4 s a process); nothing here uses it on the other backends
    sys.modules["tensorflow"] = None

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples"))
import train_keras as ex  # noqa: E402

if os.environ.get("SPOTCKPT_TEST_NO_FAST_FORWARD"):
    import spotckpt.integrations.keras as adapter

    adapter._fit_epoch_iterator = lambda model: None

pause_at = None
if "--pause-at" in sys.argv:
    i = sys.argv.index("--pause-at")
    pause_at = int(sys.argv[i + 1])
    del sys.argv[i:i + 2]


class Recorder(ex.Progress):
    epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(epoch, logs)
        Recorder.epoch = epoch
        print(f"seen epoch {epoch}", flush=True)

    def on_train_batch_begin(self, batch, logs=None):
        super().on_train_batch_begin(batch, logs)
        print(f"seen batch {Recorder.epoch} {batch} begin", flush=True)

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        print(f"seen batch {Recorder.epoch} {batch}", flush=True)
        if pause_at is not None and Recorder.epoch * self.params["steps"] + batch + 1 == pause_at:
            print(f"paused at {pause_at}", flush=True)
            sys.stdin.readline()

    def on_test_begin(self, logs=None):
        print("seen validation", flush=True)


ex.Progress = Recorder
ex.main()

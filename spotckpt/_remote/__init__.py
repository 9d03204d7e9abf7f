"""S3 and any fsspec URL: the remote store, its transfers, and one writer per job.

Storage layer, no ML imports. :class:`RemoteStore` (:mod:`._store`) is the one interface the
layers above use: listing, ranged and streamed reads, the committed checkpoints and their
manifests (:mod:`._checkpoints`), multipart uploads through boto3
(:mod:`._s3fast`, :mod:`._stream`) or fsspec (:mod:`._transfer`), error classification
(:mod:`._storeopts`). Generations (:mod:`._fence`, on the ``gen/`` prefix as :mod:`._gens`
stores, reads and prunes it) make a stale instance of the job stop before it can overwrite or
delete anything newer.
The job's incarnation history
(:mod:`._history`: how often it restarted and how each start ended) is one small object
beside them, for ``every="auto"``.
"""
from __future__ import annotations

from . import _history
from ._fence import Fence, claim, generation_of, order, payload_dir, with_generation
from ._history import HISTORY_KEY, Recorder
from ._store import RemoteStore

__all__ = ["HISTORY_KEY", "Fence", "Recorder", "RemoteStore", "_history", "claim", "generation_of", "order",
           "payload_dir", "with_generation"]

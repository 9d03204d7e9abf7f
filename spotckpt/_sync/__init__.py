"""Moving commits between the local dir and the remote.

Data-movement layer, no ML imports. :class:`Engine` (:mod:`._engine`) commits a save
locally with retention; :func:`restore_newest`, :func:`restore_part` and :func:`fetch_all`
(:mod:`._restore`) restore the newest verified checkpoint, never a local one older than the
remote's (:mod:`._stale`); :class:`Syncer` (:mod:`._syncer`)
uploads commits and the watched dir in the background, keeping the remote's retention;
:mod:`._layout` says where a rank's files go; :mod:`._pull` is the supervisor's start
(pull before the command); :class:`BackgroundWriter` (:mod:`._writer`) takes a snapshot off
the training thread; :mod:`._progress` draws transfers on a terminal.
"""
from __future__ import annotations

from ._engine import Engine
from ._layout import RankLayout, SingleLayout
from ._progress import Progress, human_bytes
from ._pull import local_freeform, open_remote, pull, remote_freeform
from ._restore import fetch_all, restore_newest, restore_part
from ._stale import check_not_stale
from ._syncer import Syncer
from ._writer import BackgroundWriter

__all__ = ["BackgroundWriter", "Engine", "Progress", "RankLayout", "SingleLayout", "Syncer", "check_not_stale", "fetch_all",
           "human_bytes", "local_freeform", "open_remote", "pull", "remote_freeform", "restore_newest",
           "restore_part"]

"""The ``spotckpt`` command line: ``run``, ``spot``, ``ls``, ``status``, ``verify``, ``pull``, ``push``.

Entry-point layer. :mod:`._main` holds the argparse parser (:func:`build_parser`, which the
docs' CLI reference is generated from) and :func:`main`; :mod:`._inspect` the read-only
commands, :mod:`._move` ``pull`` and ``push``, :mod:`._status` ``status``.
"""
from __future__ import annotations

from ._main import main

__all__ = ["main"]

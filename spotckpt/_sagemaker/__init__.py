"""The SageMaker training-container contract, for scripts written against it.

User-API layer, no ML imports. :mod:`._env` builds what a SageMaker container gives its
script (``/opt/ml`` paths, ``SM_*`` variables, hyperparameters as arguments); :mod:`._io`
downloads the input channels before the command and uploads ``model.tar.gz`` and the
output data after it.
"""
from __future__ import annotations

from ._env import Contract, add_run_arguments, contract_from_args
from ._io import download_channels, upload_artifacts

__all__ = ["Contract", "add_run_arguments", "contract_from_args", "download_channels", "upload_artifacts"]

"""Framework adapters for spotckpt, imported as ``spotckpt.integrations.<framework>``.

- ``spotckpt.integrations.lightning``: ``SpotCheckpoint`` callback for PyTorch Lightning
  (``lightning`` or ``pytorch_lightning``).
- ``spotckpt.integrations.keras``: ``SpotCheckpoint`` callback for Keras 3.
- ``spotckpt.integrations.xgboost``: ``SpotCheckpoint`` callback and a resuming ``train``.
- ``spotckpt.integrations.transformers``: ``SpotCheckpoint``, a Hugging Face ``TrainerCallback``.

Each submodule imports its framework lazily and raises a
:class:`spotckpt.MissingDependencyError` naming the extra to install when it is absent.
"""

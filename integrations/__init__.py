"""Framework adapters for spotckpt, imported as ``spotckpt.integrations.<framework>``.

Each submodule imports its framework lazily and raises a
:class:`spotckpt.MissingDependencyError` naming the extra to install when it is absent.
"""

"""The library's version, alone: what a manifest records and ``spotckpt --version`` prints."""

__version__ = "0.1.0"

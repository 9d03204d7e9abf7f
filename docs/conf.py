"""Sphinx configuration of spotckpt's documentation site (`make docs`).

Markdown pages through MyST, the API reference through autodoc (Google-style docstrings via
napoleon), the CLI reference through sphinx-argparse from ``spotckpt.cli._main.build_parser``.
"""
from __future__ import annotations

import inspect
import os
import re

# The Keras adapter's reference imports keras, which needs a backend: torch is installed
# wherever the frameworks are (make docs: .venv has `.[test,all]`).
os.environ.setdefault("KERAS_BACKEND", "torch")

import sphinxarg.ext
from sphinx.ext.autodoc.preserve_defaults import update_defvalue
from sphinx.util.inspect import stringify_signature

import spotckpt

project = "spotckpt"
author = "spotckpt authors"
copyright = "spotckpt authors"
version = release = spotckpt.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinxarg.ext",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_build/**"]

# MyST: `page.md#anchor` links to headings (h1-h3), with the anchors GitHub gives them.
myst_heading_anchors = 3

# autodoc: members in source order; types from the signatures, listed with the arguments the
# docstrings describe; defaults as written in the source (`remote=UNSET`, not an object).
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_preserve_defaults = True
autodoc_default_options = {"members": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = f"spotckpt {release}"


def _init_signature(app, what, name, obj, options, signature, return_annotation):
    """The adapters' ``SpotCheckpoint`` builds its framework class in ``__new__(*args,
    **kwargs)`` (importing the module imports no framework): document ``__init__``'s
    arguments, which are the ones a user passes."""
    if what == "class" and "__new__" in vars(obj) and "__init__" in vars(obj):
        update_defvalue(app, obj.__init__, False)   # autodoc_preserve_defaults, as for the others
        sig = inspect.signature(obj.__init__)
        sig = sig.replace(parameters=list(sig.parameters.values())[1:], return_annotation=sig.empty)
        return stringify_signature(sig, show_annotation=False), None
    return None


def setup(app):
    app.connect("autodoc-process-signature", _init_signature)


# -- CLI reference -------------------------------------------------------------------------
# sphinx-argparse renders argparse's text as reStructuredText, but spotckpt's help is plain
# text written for `--help` (`SPOTCKPT_*`, `checkpoint-*:trainer_state.json`, aligned
# example columns): docutils would read `*` as emphasis and the columns as indentation
# errors. Its parse of the parser is adapted here, for the docs only (`spotckpt --help` is
# unchanged): descriptions and epilogs become literal blocks, laid out as `--help` shows
# them; help strings are escaped; a default of None (the value then comes from a
# SPOTCKPT_* variable or the library's default, as the help says) is not shown.
_RST_SPECIAL = re.compile(r"([\\`*_|\[\]])")


def _literal(text: str) -> str:
    return "::\n\n" + "\n".join("    " + line for line in text.rstrip().splitlines()) + "\n"


def _plain(node: object) -> object:
    if isinstance(node, list):
        return [_plain(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _plain(v) for k, v in node.items()}
    for key in ("description", "epilog"):
        if out.get(key):
            out[key] = _literal(out[key])
    if isinstance(out.get("help"), str):
        out["help"] = _RST_SPECIAL.sub(r"\\\1", out["help"])
    if "default" in out and out["default"] is None:
        out["default"] = "==SUPPRESS=="
    elif out.get("default") == "":
        out["default"] = '""'
    return out


_parse_parser = sphinxarg.ext.parse_parser
sphinxarg.ext.parse_parser = lambda *a, **kw: _plain(_parse_parser(*a, **kw))

"""The documentation site (docs/, `make docs`) builds without a warning, and every link and
file path in README.md and the docs pages points to something that exists."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.relative_to(DOCS).parts)]

# Inline code that names a file of this repository: repository-relative paths, and module
# names (`_fence.py`) that the design notes give without their package.
# (`spotckpt/2` is a manifest format, `docs/_build/` what `make docs` writes.)
REPO_PATH = re.compile(r"(?!spotckpt/\d+$|docs/_build)(?:spotckpt|tests|examples|bench|docs|docker)/[\w./-]*"
                       r"|BENCHMARKS\.md|Makefile|pyproject\.toml")
BARE_PY = re.compile(r"[\w-]+\.py")
DOTTED = re.compile(r"spotckpt(?:\.\w+)+")
NOT_OURS = {"mnist.py", "train.py"}   # AWS's TF2 example, the reader's own script
LINK = re.compile(r"\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """The page without its fenced code blocks (links and paths there are examples)."""
    return re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.DOTALL | re.MULTILINE)


def _slug(heading: str) -> str:
    """The anchor of a heading, as GitHub and MyST (myst_heading_anchors) make it."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    prose = _prose(page.read_text())
    return {_slug(m.group(1).replace("`", "")) for m in re.finditer(r"^#{1,6} +(.+?) *$", prose, re.MULTILINE)}


def _module_file(dotted: list[str]) -> tuple[Path, list[str]] | None:
    """The source file of the longest module prefix of ``dotted``, and the names after it."""
    for i in range(len(dotted), 0, -1):
        base = REPO.joinpath(*dotted[:i])
        for f in (base.with_suffix(".py"), base / "__init__.py"):
            if f.is_file():
                return f, dotted[i:]
    return None


def test_every_link_and_path_exists() -> None:
    ours = {p.name for d in ("spotckpt", "bench", "tests", "examples", "docs", "docker")
            for p in (REPO / d).rglob("*.py")}
    broken = []
    for page in PAGES:
        where = page.relative_to(REPO)
        prose = _prose(page.read_text())
        for target in LINK.findall(prose):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):   # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{where}: link {target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{where}: link {target}: no heading with that anchor")
        for code in re.findall(r"`([^`\n]+)`", prose):
            if re.search(r"[*{<$ ]", code):               # globs, placeholders, commands
                continue
            if REPO_PATH.fullmatch(code):
                if not (REPO / code).exists():
                    broken.append(f"{where}: `{code}`: no such file in the repository")
            elif BARE_PY.fullmatch(code):
                if code not in ours and code not in NOT_OURS and not (page.parent / code).exists():
                    broken.append(f"{where}: `{code}`: no module of that name")
            elif DOTTED.fullmatch(code):
                found = _module_file(code.split("."))
                if found is None:
                    broken.append(f"{where}: `{code}`: no such module")
                elif found[1] and not re.search(rf"\b{found[1][0]}\b", found[0].read_text()):
                    broken.append(f"{where}: `{code}`: {found[0].relative_to(REPO)} has no {found[1][0]}")
    assert not broken, "\n".join(broken)


def test_docs_build_without_warnings(tmp_path: Path) -> None:
    pytest.importorskip("sphinx", reason="the docs extra is not installed (pip install '.[docs]')")
    for module in ("myst_parser", "sphinxarg", "furo"):
        pytest.importorskip(module, reason="the docs extra is not installed (pip install '.[docs]')")
    out = tmp_path / "html"
    p = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
                        "-d", str(tmp_path / "doctrees"), str(DOCS), str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and not p.stderr.strip(), p.stdout + p.stderr
    # the generated references are there: autodoc's classes, sphinx-argparse's options
    api, cli = (out / "api.html").read_text(), (out / "cli.html").read_text()
    assert "spotckpt.Checkpointer" in api and "spotckpt.integrations.keras.SpotCheckpoint" in api
    assert "--dir-checkpoint" in cli and "--interrupt-at" in cli
    for page in PAGES[1:]:
        html = out / page.relative_to(DOCS).with_suffix(".html")
        assert html.is_file(), f"{page.relative_to(REPO)} was not built (not in a toctree?)"

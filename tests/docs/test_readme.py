"""The README's quick start (its `## Quick start` section's first Python block) runs as written."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_env

pytestmark = pytest.mark.slow  # real training runs: not in make test-fast


def quick_start() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Quick start", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_quick_start_runs_twice_and_resumes(tmp_path: Path) -> None:
    code = quick_start()
    (tmp_path / "quick.py").write_text(code)
    outs = []
    for _ in range(2):
        p = subprocess.run([sys.executable, "quick.py"], cwd=tmp_path, env=run_env(),
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        outs.append(p.stdout.strip())
    assert outs == ["restored from None finished at 200", "restored from 200 finished at 200"]

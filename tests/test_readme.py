"""The README's example runs as printed, on the embedded defaults and on Redis."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REDIS_URL, require_server, unique

README = Path(__file__).resolve().parent.parent / "README.md"


def example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    return str(blocks[0])


def run_example(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ACCORD_")}
    environ.update(ACCORD_STORAGE=str(tmp_path), **env)
    return subprocess.run(
        [sys.executable, "-c", example()], capture_output=True, text=True, env=environ, timeout=60
    )


def test_the_first_example_is_short_and_runs(tmp_path: Path) -> None:
    assert len(example().strip().splitlines()) < 25
    result = run_example(tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "bonjour"


@pytest.mark.redis
def test_the_same_example_runs_on_redis(tmp_path: Path) -> None:
    require_server("Redis", REDIS_URL, 6379)
    result = run_example(tmp_path, ACCORD_CLUSTER_URL=REDIS_URL, ACCORD_APP_NAME=unique("readme"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "bonjour"

"""The `accord` command."""

from __future__ import annotations

import subprocess
import sys

import accord


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "accord", *args], capture_output=True, text=True, timeout=120
    )


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"accord {accord.__version__}"


def test_no_command_prints_help_and_fails() -> None:
    result = run()
    assert result.returncode == 2
    assert "demo" in result.stdout


def test_demo_narrates_every_step(tmp_path: object) -> None:
    result = run("demo")
    assert result.returncode == 0, result.stderr
    for title in (
        "Lifecycle",
        "Database",
        "Cache",
        "Pub/sub",
        "Sync messages",
        "Event queue",
        "Locks",
    ):
        assert title in result.stdout
    assert "demo finished" in result.stdout
    assert "Traceback" not in result.stderr

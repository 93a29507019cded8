"""Helpers for the ``deeplab segment`` tests: run the CLI in-process or as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from click.testing import CliRunner

from deeplab_cli.cli import cli
from deeplab_cli.errors import DeeplabError

REPO = Path(__file__).resolve().parent.parent
DM05 = "deeplabv3-mnv2-dm05-voc"


@dataclass
class Outcome:
    code: int
    stdout: bytes
    stderr: str

    @property
    def text(self) -> str:
        return self.stdout.decode()


def invoke(args: list[str], stdin: str | bytes | None = None) -> Outcome:
    """Run ``deeplab <args>`` in this process, with the exit code ``deeplab_cli.cli.main`` would give."""
    result = CliRunner().invoke(cli, [str(a) for a in args], input=stdin)
    code = result.exit_code
    stderr = result.stderr
    if isinstance(result.exception, DeeplabError):
        code = result.exception.exit_code
        stderr += f"deeplab: error: {result.exception}\n"
    elif result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Outcome(code=code, stdout=result.stdout_bytes, stderr=stderr)


def command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "deeplab_cli", *[str(a) for a in args]]


def run_process(args: list[str], stdin: bytes | None = None, timeout: float = 300) -> Outcome:
    """Run ``python -m deeplab_cli <args>`` as a subprocess (real stdin/stdout, signals, exit codes)."""
    result = subprocess.run(
        command(args), input=stdin, capture_output=True, timeout=timeout, env=dict(os.environ)
    )
    return Outcome(code=result.returncode, stdout=result.stdout, stderr=result.stderr.decode())

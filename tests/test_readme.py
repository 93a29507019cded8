"""Every command in the README's code blocks runs, offline, against ../shared, as a user would type it.

How the README is read (so that it stays a user's manual, not a test script):
- Each ``bash`` block line is one command (``\\`` continues a line). ``pip install ... &&`` prefixes are
  install steps that CI itself performs: the rest of the line runs. The test command is not run again.
- A trailing comment marks what a command needs that a test machine does not have: ``(needs network)``,
  ``(needs a GPU)``, ``(needs a cluster)``, or ``(runs for minutes)`` for the benchmarks. Those are
  skipped, visibly, with that reason.
- ``ruff`` and ``python benchmarks/...`` commands run in the repository; the rest in the sandbox.
- A trailing comment ``(exit N)`` documents a non-zero exit status; otherwise the command must exit 0.
- Paths in backticks in the trailing comment (e.g. ``# `out/photo.png`: the mask``) must exist afterwards.
- ``python`` blocks run as scripts.

Each README section runs in its own sandbox: a working folder holding ``photo.jpg`` and ``photos/`` (real
VOC images) with ``../shared`` beside it, and a weight cache filled from the shared mirror.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO, SHARED, VOC2012, voc_sample_ids

README = REPO / "README.md"
NEEDS = re.compile(r"\((needs network|needs a GPU|needs a cluster|runs for minutes)\)")
EXIT = re.compile(r"\(exit (\d+)\)")
BACKTICKED = re.compile(r"`([^`\s]+)`")
TIMEOUT_S = 600


@dataclass
class Command:
    """One README command: its shell text, what it needs, its expected status and files."""

    text: str
    needs: str | None = None
    status: int = 0
    creates: list[str] = field(default_factory=list)


@dataclass
class Section:
    title: str
    commands: list[Command] = field(default_factory=list)
    scripts: list[str] = field(default_factory=list)


def _split_comment(line: str) -> tuple[str, str]:
    """(command, trailing comment) on the first `` # `` outside quotes."""
    lexer_quote = None
    for index, char in enumerate(line):
        if char in "'\"" and lexer_quote in (None, char):
            lexer_quote = None if lexer_quote == char else char
        elif char == "#" and lexer_quote is None and (index == 0 or line[index - 1].isspace()):
            return line[:index].rstrip(), line[index + 1 :].strip()
    return line.rstrip(), ""


def _command(line: str) -> Command | None:
    text, comment = _split_comment(line)
    if not text:
        return None
    if text.startswith("pip install"):
        if "&&" not in text:
            return None
        text = text.split("&&", 1)[1].strip()
    if "python -m pytest" in text:
        return None
    needs = NEEDS.search(comment)
    status = EXIT.search(comment)
    return Command(
        text=text,
        needs=needs.group(1) if needs else None,
        status=int(status.group(1)) if status else 0,
        creates=[p for p in BACKTICKED.findall(comment) if "/" in p or "." in p],
    )


def readme_sections(path: Path = README) -> list[Section]:
    """The README's sections (## and ### headings) with their bash commands and python scripts."""
    sections: list[Section] = []
    current = Section("preamble")
    block: list[str] | None = None
    language = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        if block is None and raw.startswith("#"):
            if current.commands or current.scripts:
                sections.append(current)
            current = Section(raw.lstrip("#").strip())
        elif raw.startswith("```"):
            if block is None:
                block, language = [], raw[3:].strip()
                continue
            if language in ("bash", "sh"):
                joined = "\n".join(block).replace("\\\n", " ")
                current.commands += [c for c in map(_command, joined.splitlines()) if c]
            elif language == "python":
                current.scripts.append("\n".join(block))
            block = None
        elif block is not None:
            block.append(raw)
    if current.commands or current.scripts:
        sections.append(current)
    return sections


def _sandbox(root: Path) -> Path:
    """A working folder with the files the README's examples name, and ../shared beside it."""
    work = root / "work"
    work.mkdir()
    (root / "shared").symlink_to(SHARED, target_is_directory=True)
    ids = voc_sample_ids(4)
    shutil.copy(VOC2012 / "JPEGImages" / f"{ids[0]}.jpg", work / "photo.jpg")
    for index, image_id in enumerate(ids[1:]):
        folder = work / "photos" / ("a" if index % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(VOC2012 / "JPEGImages" / f"{image_id}.jpg", folder / f"{image_id}.jpg")
    return work


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DEEPLAB_OFFLINE"] = "1"
    env["DEEPLAB_MIRROR"] = str(SHARED / "weights")
    env["PYTHONPATH"] = str(REPO)
    return env


def _in_repository(command: Command) -> bool:
    return command.text.startswith(("ruff ", "python benchmarks/"))


def _stop_background_servers(work: Path) -> None:
    """Stop what a section left running in the background (it wrote its pid to a ``*.pid`` file)."""
    for pid_file in work.glob("*.pid"):
        with contextlib.suppress(ValueError, OSError):
            os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)


def _run(command: Command, cwd: Path, env: dict[str, str]) -> None:
    cwd = REPO if _in_repository(command) else cwd
    result = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command.text],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )
    detail = f"$ {command.text}\nexit {result.returncode}\n{result.stderr[-2000:]}"
    assert result.returncode == command.status, detail
    assert "Traceback" not in result.stderr, detail
    for created in command.creates:
        assert (cwd / created).exists(), f"{detail}\nREADME says {created} appears; it does not"


SECTIONS = readme_sections()


def test_readme_has_commands() -> None:
    """The parser finds the README's commands (guards against a silently empty parametrisation)."""
    commands = [c for s in SECTIONS for c in s.commands]
    assert len(commands) >= 20
    assert any(c.text.startswith("deeplab segment") for c in commands)
    assert all(shlex.split(c.text) for c in commands)


@pytest.mark.parametrize("section", SECTIONS, ids=[s.title for s in SECTIONS])
def test_readme_section_runs(section: Section, tmp_path: Path) -> None:
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    work = _sandbox(tmp_path)
    env = _environment()
    skipped = []
    try:
        for command in section.commands:
            if command.needs:
                skipped.append(f"{command.text} ({command.needs})")
                continue
            _run(command, work, env)
        for index, script in enumerate(section.scripts):
            path = work / f"readme_script_{index}.py"
            path.write_text(script, encoding="utf-8")
            _run(Command(f"{shlex.quote(sys.executable)} {path.name}"), work, env)
    finally:
        _stop_background_servers(work)
    if skipped and not (section.commands and len(skipped) < len(section.commands)) and not section.scripts:
        pytest.skip("; ".join(skipped))
    for line in skipped:
        print(f"skipped: {line}")

"""The README is a short front page whose commands and examples work; every link of the
README and of docs/ reaches a file (and a heading, where it names one)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_readme_is_a_front_page_with_the_two_quickstart_commands_first():
    lines = README.read_text().splitlines()
    assert len(lines) < 150
    commands = [block.strip() for block in _blocks(README.read_text(), "bash")]
    demo = next(i for i, line in enumerate(lines) if line == 'pip install -e ".[cli]" && neusub demo')
    assert demo < 30
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in commands  # CI runs exactly the README's test command


def test_links_reach_files_and_headings():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and file.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", file.read_text(), flags=re.M)
                if anchor not in {_slug(h) for h in headings}:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert broken == []


def test_the_readme_examples_name_only_what_they_define(tmp_path: Path):
    blocks = _blocks(README.read_text(), "python")
    assert len(blocks) >= 2
    files = []
    for index, block in enumerate(blocks):
        files.append(tmp_path / f"readme_{index}.py")
        files[-1].write_text(block)
    ruff = [sys.executable, "-m", "ruff", "check", "--no-cache", "--isolated", "--select", "F821,F841"]
    result = subprocess.run([*ruff, *map(str, files)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("index", range(2))
def test_the_readme_examples_run(index: int, capsys):
    block = _blocks(README.read_text(), "python")[index]
    exec(compile(block, f"README.md example #{index + 1}", "exec"), {})  # their asserts must hold

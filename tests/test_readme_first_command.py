"""README's expected output of its first command is what `sw detect` prints today (box lines aside)."""

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from superweight.cli import app

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[1] / "README.md"
BOX = re.compile(r"^[\s┏┓┗┛┡┩┯┷╇━─┃│┳┻╋┼└┘┌┐├┤┬┴]+$")


def _readme_expected_output() -> list[str]:
    text = README.read_text(encoding="utf-8")
    start = text.index("Expected output of the first command")
    block = text[text.index("```\n", start) + 4:]
    return block[:block.index("```")].rstrip("\n").splitlines()


def _normalised(lines: list[str]) -> list[str]:
    """Table cells without their box characters, whitespace collapsed: the words and numbers."""
    kept = [line for line in lines if line.strip() and not BOX.match(line)]
    return [" ".join(re.sub(r"[┃│]", " ", line).split()) for line in kept]


def test_readme_first_command_output_is_what_sw_detect_prints(gguf_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default coordinates file is written to the current folder
    result = CliRunner().invoke(app, ["detect"])
    assert result.exit_code == 0, result.output
    printed = _normalised(result.stdout.splitlines())
    assert printed == _normalised(_readme_expected_output())

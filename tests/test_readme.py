"""The README stays true: its configuration reference matches the schema, and its commands exist."""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.cli import build_parser
from pipeline.config import load_config
from pipeline.config_reference import check

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_configuration_reference_is_current() -> None:
    assert check(README), "stale reference: run python -m pipeline.config_reference --write README.md"


def test_quick_start_commands_point_at_real_files() -> None:
    text = README.read_text()
    assert "./setup.sh && .venv/bin/scratchgpt run configs/default.yaml" in text
    assert "./setup.sh && .venv/bin/pytest" in text
    assert (ROOT / "setup.sh").stat().st_mode & 0o111
    load_config(ROOT / "configs" / "default.yaml")  # the main job's config is valid


def test_every_scratchgpt_subcommand_named_in_the_readme_exists() -> None:
    commands = set(build_parser()._subparsers._group_actions[0].choices)  # noqa: SLF001
    named = set(re.findall(r"scratchgpt ([a-z]+)\b", README.read_text())) - {"sets"}  # "scratchgpt sets up…"
    assert named - commands == set()

"""Arguments that every config-taking command shares."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="KEY.PATH=VALUE", help="override single keys")

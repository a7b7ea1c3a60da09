"""Shared by the data-stage tests: where the shared data lies, and how to read what prep writes. Holds no tests."""

from __future__ import annotations

import json
from pathlib import Path

import zstandard

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WEB = SHARED / "web"


def read_zst_jsonl(folder: Path) -> list[dict]:
    """Every row of the .jsonl.zst files in `folder` (prep's output layout), file by file in name order."""
    rows = []
    for path in sorted(folder.glob("*.jsonl.zst")):
        text = zstandard.ZstdDecompressor().stream_reader(path.open("rb")).read().decode()
        rows += [json.loads(line) for line in text.splitlines()]
    return rows

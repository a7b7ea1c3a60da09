"""Text normalisation as datatrove steps: Unicode NFC, mojibake repair (ftfy), whitespace clean-up."""

from __future__ import annotations

import re
import unicodedata

from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.formatters import FTFYFormatter
from datatrove.pipeline.formatters.base import BaseFormatter

from dataprep.config import NormalizeConfig

_TRAILING_SPACE = re.compile(r"[ \t\r\f\v]+\n")
_BLANK_RUNS = re.compile(r"\n{3,}")


class UnicodeNFC(BaseFormatter):
    """Compose characters (NFC) so that the same text always has the same code points (and hash)."""

    name = "NFC"

    def format(self, text: str) -> str:
        return unicodedata.normalize("NFC", text)


class WhitespaceCleanup(BaseFormatter):
    """Unix newlines, no trailing spaces, at most one blank line in a row, no leading/trailing blank lines.

    Indentation inside lines is kept: docstrings and code examples need it.
    """

    name = "whitespace"

    def format(self, text: str) -> str:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        text = _TRAILING_SPACE.sub("\n", text + "\n")
        text = _BLANK_RUNS.sub("\n\n", text)
        return text.strip("\n").rstrip()


def normalize_steps(cfg: NormalizeConfig) -> list[PipelineStep]:
    """The configured normalisation steps, in order: mojibake first (it needs the raw bytes' pattern), NFC, spaces."""
    steps: list[PipelineStep] = []
    if cfg.fix_mojibake:
        steps.append(FTFYFormatter())
    if cfg.nfc:
        steps.append(UnicodeNFC())
    if cfg.whitespace:
        steps.append(WhitespaceCleanup())
    return steps

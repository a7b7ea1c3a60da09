"""The config sections the data stages consume: `data`, `prep`, `tokenizer`, `shards`.

Every filter is a key under `prep.filters`; `false` turns it off, `true` keeps the
defaults, a mapping sets parameters.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)



class DataConfig(Section):
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


class LengthFilter(Section):
    min_chars: int = Field(200, ge=0)
    max_chars: int = Field(1_000_000, gt=0)


class GopherQualityFilter(Section):
    min_doc_words: int = 50
    max_doc_words: int = 100_000
    min_avg_word_length: float = 3
    max_avg_word_length: float = 10
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    max_non_alpha_words_ratio: float = 0.8
    min_stop_words: int = 2


class GopherRepetitionFilter(Section):
    dup_line_frac: float = 0.3
    dup_para_frac: float = 0.3
    dup_line_char_frac: float = 0.2
    dup_para_char_frac: float = 0.2


class C4QualityFilter(Section):
    filter_no_terminal_punct: bool = True
    min_num_sentences: int = 5
    min_words_per_line: int = 3
    max_word_length: int = 1000
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True


class FineWebQualityFilter(Section):
    line_punct_thr: float = 0.12
    short_line_thr: float = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    new_line_ratio: float = 0.3


class LanguageFilter(Section):
    languages: list[str] = Field(default_factory=lambda: ["en"])
    threshold: float = Field(0.65, ge=0, le=1)


class PiiFilter(Section):
    emails: bool = True
    ip_addresses: bool = True


class FiltersConfig(Section):
    length: LengthFilter | Literal[False] = Field(default_factory=LengthFilter)
    gopher_quality: GopherQualityFilter | Literal[False] = Field(default_factory=GopherQualityFilter)
    gopher_repetition: GopherRepetitionFilter | Literal[False] = Field(default_factory=GopherRepetitionFilter)
    c4_quality: C4QualityFilter | Literal[False] = Field(default_factory=C4QualityFilter)
    fineweb_quality: FineWebQualityFilter | Literal[False] = Field(default_factory=FineWebQualityFilter)
    language: LanguageFilter | Literal[False] = Field(default_factory=LanguageFilter)
    pii: PiiFilter | Literal[False] = Field(default_factory=PiiFilter)

    @field_validator("*", mode="before")
    @classmethod
    def _true_means_defaults(cls, value: Any, info: Any) -> Any:
        if value is True:
            return cls.model_fields[info.field_name].default_factory()
        return value


class NormalizeConfig(Section):
    nfc: bool = True
    fix_mojibake: bool = Field(True, description="Repair mis-decoded text with ftfy.")
    whitespace: bool = Field(True, description="Strip trailing spaces, collapse runs of blank lines.")


class MinhashConfig(Section):
    ngram: int = Field(5, ge=1)
    buckets: int = Field(14, ge=1)
    hashes_per_bucket: int = Field(8, ge=1)


class DedupConfig(Section):
    exact: bool = True
    minhash: MinhashConfig | Literal[False] = Field(default_factory=MinhashConfig)

    @field_validator("minhash", mode="before")
    @classmethod
    def _true_means_defaults(cls, value: Any) -> Any:
        return MinhashConfig() if value is True else value


class PrepConfig(Section):
    tasks: int = Field(2, ge=1, description="datatrove tasks (input files are split between them).")
    workers: int = Field(2, ge=1, description="Tasks run at once by the local executor.")
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig)
    filters: FiltersConfig = Field(default_factory=FiltersConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)


class TokenizerConfig(Section):
    vocab_size: int = Field(8192, ge=260, le=2**32 - 1)
    min_frequency: int = Field(2, ge=1)
    sample_bytes: int | None = Field(
        None, description="Train on at most this many bytes of clean text (None: all of it)."
    )
    heldout_fraction: float = Field(
        0.02, ge=0, lt=1, description="Share of the text (~4 KB pieces, chosen by content hash) held back "
        "from training to measure bytes/token."
    )
    eot_token: str = "<|endoftext|>"


class ShardsConfig(Section):
    val_fraction: float = Field(0.05, ge=0, lt=1)
    max_shard_bytes: int = Field(256 * 2**20, gt=0, description="Shards are cut at about this many bytes.")
    tasks: int = Field(2, ge=1)
    workers: int = Field(2, ge=1)
    compression: Literal["none", "zstd"] = Field(
        "none", description="zstd makes shards smaller for archiving but they can no longer be memory-mapped."
    )

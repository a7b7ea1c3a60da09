"""Exact and MinHash deduplication with datatrove's dedup stages.

Exact: a 64-bit xxhash of the normalised text (datatrove's ExactDedupSignature
/ ExactFindDedups / ExactDedupFilter). Among identical copies the one first in
its task's stream is kept (datatrove breaks ties by position in the task).

MinHash: datatrove's four stages with FineWeb's defaults (5-grams, 14 buckets x
8 hashes: pages with Jaccard similarity ~0.75 and up are caught). In each
cluster of near-duplicates the document that sorts first (task, position) is kept.
"""

from __future__ import annotations

from pathlib import Path

from datatrove.data import Document
from datatrove.pipeline.dedup.exact_dedup import (
    ExactDedupConfig,
    ExactDedupFilter,
    ExactDedupSignature,
    ExactFindDedups,
)
from datatrove.pipeline.dedup.minhash import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.utils.hashing import HashConfig

from dataprep.config import MinhashConfig as MinhashSection
from dataprep.removed import RemovedWriter


def normalised_text(doc: Document) -> str:
    """What exact dedup hashes: the text after normalisation (NFC, ftfy, whitespace)."""
    return doc.text


def exact_config() -> ExactDedupConfig:
    return ExactDedupConfig(content_getter=normalised_text, hash_config=HashConfig(precision=64))


def exact_signature(work: Path) -> ExactDedupSignature:
    return ExactDedupSignature(output_folder=str(work / "exact_sigs"), config=exact_config(), finder_workers=1)


def exact_find(work: Path) -> ExactFindDedups:
    return ExactFindDedups(str(work / "exact_sigs"), str(work / "exact_dups"), config=exact_config())


def exact_filter(work: Path, removed: Path) -> ExactDedupFilter:
    writer = RemovedWriter(removed, "exact_dedup", "exact copy of a kept document")
    return ExactDedupFilter(str(work / "exact_dups"), config=exact_config(), exclusion_writer=writer)


def minhash_config(cfg: MinhashSection) -> MinhashConfig:
    return MinhashConfig(
        n_grams=cfg.ngram, num_buckets=cfg.buckets, hashes_per_bucket=cfg.hashes_per_bucket,
        hash_config=HashConfig(precision=64),
    )


def minhash_signature(work: Path, cfg: MinhashSection, language: str = "en") -> MinhashDedupSignature:
    """Shingles are word n-grams, so the words come from the language's tokenizer (jieba for Chinese)."""
    from datatrove.utils.word_tokenizers import load_tokenizer_assignments

    from dataprep.languages import resolve_language

    code = resolve_language(language).tokenizer
    step = MinhashDedupSignature(output_folder=str(work / "minhash_sigs"), config=minhash_config(cfg), language=code)
    # datatrove hands out one cached tokenizer per language; once a filter ran in this process it holds a
    # loaded spaCy pipeline that cannot be copied to the next sub-stage, so this step gets its own.
    step.word_tokenizer = load_tokenizer_assignments()[code]()
    return step


def minhash_buckets(work: Path, cfg: MinhashSection) -> MinhashDedupBuckets:
    return MinhashDedupBuckets(str(work / "minhash_sigs"), str(work / "minhash_buckets"), config=minhash_config(cfg))


def minhash_cluster(work: Path, cfg: MinhashSection) -> MinhashDedupCluster:
    return MinhashDedupCluster(str(work / "minhash_buckets"), str(work / "minhash_remove"), config=minhash_config(cfg))


def minhash_filter(work: Path, removed: Path) -> MinhashDedupFilter:
    writer = RemovedWriter(removed, "minhash_dedup", "near-duplicate of a kept document (MinHash)")
    return MinhashDedupFilter(str(work / "minhash_remove"), exclusion_writer=writer)

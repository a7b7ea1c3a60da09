"""The datatrove step that tokenizes documents and writes Arrow token shards, one task's share at a time.

Each task writes its own shard files (`<split>/<source>-<task>-<n>.arrow`) and a
part file `_parts/<source>-<task>.json` with their manifest entries; the shard
stage merges the parts into manifest.json once every task is done. So tasks
never share a file, and a rerun of a failed task rewrites exactly its own files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from dataprep.shards import ShardWriter, pack_documents, shard_metadata
from dataprep.tokenizer import eot_id, load_tokenizer, text_encoder, tokenizer_sha256, unit_hash

PARTS_DIR = "_parts"
SplitRule = Literal["hash", "train", "val"]


def split_of(doc_id: str, val_fraction: float) -> str:
    """train or val for a document, from its id alone: the same whatever the task count or file order."""
    return "val" if unit_hash("split:" + doc_id) < val_fraction else "train"


class TokenShardWriter(PipelineStep):
    """Tokenizes each task's documents in batches and writes them to size-bounded Arrow shards.

    split: "hash" puts a `val_fraction` of documents (by a hash of their id) into
    val and the rest into train; "train" or "val" puts every document there
    (for `data.val_inputs`).
    """

    name = "🔢 Arrow token shards"
    type = "🔢 - TOKENIZER"

    def __init__(
        self,
        tokenizer_dir: str | Path,
        shards_dir: str | Path,
        source: str = "docs",
        split: SplitRule = "hash",
        val_fraction: float = 0.05,
        max_shard_bytes: int = 256 * 2**20,
        compression: str = "none",
        batch_bytes: int = 4 * 2**20,
        data_source: str | None = None,
    ):
        super().__init__()
        self.data_source = data_source  # the data.sources entry these documents belong to (None: data.inputs)
        self.tokenizer_dir = str(tokenizer_dir)
        self.shards_dir = str(shards_dir)
        self.source = source
        self.split = split
        self.val_fraction = val_fraction
        self.max_shard_bytes = max_shard_bytes
        self.compression = compression
        self.batch_bytes = batch_bytes  # text handed to the Rust encoder at once (it parallelises within a batch)

    def _batches(self, data: DocumentsPipeline) -> Iterator[list[Document]]:
        batch: list[Document] = []
        size = 0
        for doc in data or ():
            batch.append(doc)
            size += len(doc.text)
            if size >= self.batch_bytes:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        tok = text_encoder(load_tokenizer(self.tokenizer_dir))
        metadata = shard_metadata(tokenizer_sha256(self.tokenizer_dir), tok.get_vocab_size(), eot_id(tok))
        stem = f"{self.source}-{rank:05d}"
        shards_dir = Path(self.shards_dir)
        for split in ("train", "val"):  # a rerun of this task replaces what an interrupted run left
            for stale in (shards_dir / split).glob(f"{stem}-*.arrow*"):
                stale.unlink()
        writers = {split: ShardWriter(shards_dir, split, stem, metadata, self.max_shard_bytes, self.compression)
                   for split in ("train", "val")}
        eot = int(metadata["eot_id"])
        for batch in self._batches(data):
            with self.track_time(unit="batch"):
                texts = [doc.text for doc in batch]
                encodings = tok.encode_batch_fast(texts)
                by_split: dict[str, tuple[list[list[int]], list[int]]] = {"train": ([], []), "val": ([], [])}
                for doc, text, enc in zip(batch, texts, encodings, strict=True):
                    split = self.split if self.split != "hash" else split_of(str(doc.id), self.val_fraction)
                    ids, sizes = by_split[split]
                    ids.append(enc.ids)
                    sizes.append(len(text.encode("utf-8")))
                for split, (ids, sizes) in by_split.items():
                    if ids:
                        writers[split].write(pack_documents(ids, sizes, eot, metadata["dtype"]))
                        self.stat_update(f"{split}_docs", value=len(ids))
                        self.stat_update(f"{split}_tokens", value=sum(len(i) + 1 for i in ids))
            for doc in batch:
                self.update_doc_stats(doc)
        entries = {split: writer.close() for split, writer in writers.items()}
        part = {"source": self.source, "rank": rank, "world_size": world_size, "metadata": metadata,
                "shards": entries}
        if self.data_source is not None:
            part["data_source"] = self.data_source
        parts = shards_dir / PARTS_DIR
        parts.mkdir(parents=True, exist_ok=True)
        tmp = parts / f"{stem}.json.tmp"
        tmp.write_text(json.dumps(part, indent=2), encoding="utf-8")
        os.replace(tmp, parts / f"{stem}.json")
        return
        yield  # a generator that yields nothing: this step is the end of the pipeline


def read_parts(shards_dir: str | Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted((Path(shards_dir) / PARTS_DIR).glob("*.json"))]

"""The token-shard format: Arrow IPC files of tokenized documents, and the manifest that lists them.

Layout under `shards_dir`:

    train/<source>-<task>-<n>.arrow   one row per document, column `input_ids`
    val/<source>-<task>-<n>.arrow     (large_list<uint16>, or uint32 for vocabularies over 65536),
    manifest.json                     the end-of-text id appended to each document

Files are uncompressed by default so that a reader memory-maps them and uses
the token buffers in place, without copying. zstd compression (for archiving)
makes the files smaller, but then reading decompresses into memory.

Schema metadata repeats what the manifest says about the tokenizer, so a shard
that strays into another run's folder is recognised.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dataprep.errors import ScratchgptError

FORMAT = "scratchgpt-tokens"
VERSION = 1
COLUMN = "input_ids"
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
META_KEYS = ("format", "version", "tokenizer_sha256", "vocab_size", "eot_id", "dtype")


class ShardError(ScratchgptError, ValueError):
    """Shards that cannot be used as they are; the message names the file and what is wrong."""


def dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def shard_metadata(tokenizer_sha256: str, vocab_size: int, eot_id: int) -> dict[str, str]:
    return {
        "format": FORMAT,
        "version": str(VERSION),
        "tokenizer_sha256": tokenizer_sha256,
        "vocab_size": str(vocab_size),
        "eot_id": str(eot_id),
        "dtype": dtype_for_vocab(vocab_size),
    }


def shard_schema(metadata: dict[str, str]) -> Any:
    import pyarrow as pa

    value_type = pa.uint16() if metadata["dtype"] == "uint16" else pa.uint32()
    return pa.schema([pa.field(COLUMN, pa.large_list(pa.field("item", value_type, nullable=False)), nullable=False)],
                     metadata=metadata)


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class DocBatch:
    """Tokenized documents as one flat buffer: document i is values[offsets[i]:offsets[i+1]]."""

    values: np.ndarray  # uint16/uint32, end-of-text included
    offsets: np.ndarray  # int64, len = docs + 1, offsets[0] == 0
    text_bytes: np.ndarray  # int64 per document: UTF-8 bytes of its text

    @property
    def docs(self) -> int:
        return len(self.offsets) - 1

    def rows(self, start: int, stop: int) -> DocBatch:
        base = self.offsets[start]
        return DocBatch(self.values[base : self.offsets[stop]], self.offsets[start : stop + 1] - base,
                        self.text_bytes[start:stop])


def pack_documents(token_lists: list[list[int]], text_bytes: list[int], eot_id: int, dtype: str) -> DocBatch:
    """Documents' token ids -> one DocBatch with the end-of-text id after each document."""
    lengths = np.fromiter((len(t) + 1 for t in token_lists), dtype=np.int64, count=len(token_lists))
    offsets = np.zeros(len(token_lists) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = np.empty(int(offsets[-1]), dtype=dtype)
    for ids, start, stop in zip(token_lists, offsets[:-1], offsets[1:], strict=True):
        values[start : stop - 1] = ids
    values[offsets[1:] - 1] = eot_id
    return DocBatch(values, offsets, np.asarray(text_bytes, dtype=np.int64))


@dataclass
class _OpenShard:
    rel_path: str
    tmp_path: Path
    writer: Any
    sink: Any
    docs: int = 0
    tokens: int = 0
    text_bytes: int = 0
    payload_bytes: int = 0


@dataclass
class ShardWriter:
    """Writes one split's documents of one task into size-bounded shards: `<split>/<stem>-<n>.arrow`.

    Each file is written as `.tmp` and renamed when complete, so a crash never
    leaves a truncated shard under a real name. `close()` returns the manifest
    entries of the files written.
    """

    shards_dir: Path
    split: str
    stem: str
    metadata: dict[str, str]
    max_shard_bytes: int = 256 * 2**20
    compression: str = "none"
    written: list[dict[str, Any]] = field(default_factory=list)
    _current: _OpenShard | None = None

    def __post_init__(self) -> None:
        self.shards_dir = Path(self.shards_dir)
        (self.shards_dir / self.split).mkdir(parents=True, exist_ok=True)
        self._schema = shard_schema(self.metadata)
        self._itemsize = np.dtype(self.metadata["dtype"]).itemsize

    def _open(self) -> _OpenShard:
        import pyarrow as pa

        rel = f"{self.split}/{self.stem}-{len(self.written):04d}.arrow"
        tmp = self.shards_dir / (rel + ".tmp")
        sink = pa.OSFile(str(tmp), "wb")
        options = pa.ipc.IpcWriteOptions(compression=None if self.compression == "none" else self.compression)
        writer = pa.ipc.new_file(sink, self._schema, options=options)
        return _OpenShard(rel, tmp, writer, sink)

    def _row_bytes(self, batch: DocBatch) -> np.ndarray:
        """Cumulative payload bytes after each row (tokens plus one 8-byte offset)."""
        return np.cumsum(np.diff(batch.offsets) * self._itemsize + 8)

    def write(self, batch: DocBatch) -> None:
        start = 0
        while start < batch.docs:
            if self._current is None:
                self._current = self._open()
            cur = self._current
            room = self.max_shard_bytes - cur.payload_bytes
            cumulative = self._row_bytes(batch.rows(start, batch.docs))
            fit = int(np.searchsorted(cumulative, room, side="right"))
            if fit == 0 and cur.docs > 0:  # the next document does not fit: start a new shard
                self._finish()
                continue
            stop = start + max(fit, 1)  # a document larger than a shard gets a shard of its own
            self._append(batch.rows(start, stop))
            start = stop
            if self._current is not None and self._current.payload_bytes >= self.max_shard_bytes:
                self._finish()

    def _append(self, part: DocBatch) -> None:
        import pyarrow as pa

        cur = self._current
        assert cur is not None
        values = pa.array(part.values)  # wraps the numpy buffer
        column = pa.LargeListArray.from_arrays(pa.array(part.offsets, type=pa.int64()), values,
                                               type=self._schema.field(COLUMN).type)
        cur.writer.write_batch(pa.record_batch([column], schema=self._schema))
        cur.docs += part.docs
        cur.tokens += len(part.values)
        cur.text_bytes += int(part.text_bytes.sum())
        cur.payload_bytes += len(part.values) * self._itemsize + 8 * part.docs

    def _finish(self) -> None:
        cur = self._current
        if cur is None:
            return
        self._current = None
        cur.writer.close()
        cur.sink.close()
        final = self.shards_dir / cur.rel_path
        os.replace(cur.tmp_path, final)
        self.written.append({"path": cur.rel_path, "sha256": file_sha256(final), "docs": cur.docs,
                             "tokens": cur.tokens, "bytes": cur.text_bytes, "file_bytes": final.stat().st_size})

    def close(self) -> list[dict[str, Any]]:
        self._finish()
        return self.written


# ---- reading ---------------------------------------------------------------------------------------------------


@dataclass
class ShardView:
    """An opened shard: its schema metadata and the token buffers, one per record batch.

    For an uncompressed file the buffers are numpy views into the memory map:
    nothing of the token data is copied until a batch is cut from it.
    """

    path: Path
    metadata: dict[str, str]
    chunks: list[np.ndarray]  # flat tokens of each record batch (documents back to back)
    doc_offsets: list[np.ndarray]  # per record batch, int64 offsets of its documents within its chunk
    mmap: Any  # keeps the mapping alive as long as the views are

    @property
    def tokens(self) -> int:
        return sum(len(c) for c in self.chunks)

    @property
    def docs(self) -> int:
        return sum(len(o) - 1 for o in self.doc_offsets)

    def documents(self) -> list[np.ndarray]:
        """Each document's tokens (views), end-of-text included."""
        return [chunk[o[i] : o[i + 1]] for chunk, o in zip(self.chunks, self.doc_offsets, strict=True)
                for i in range(len(o) - 1)]


def open_shard(path: str | Path, memory_map: bool = True) -> ShardView:
    """Open a shard file; raises ShardError naming the file when it is not one of ours."""
    import pyarrow as pa

    path = Path(path)
    if not path.is_file():
        raise ShardError(f"shard file {path} does not exist")
    try:
        source = pa.memory_map(str(path), "r") if memory_map else pa.OSFile(str(path), "rb")
        reader = pa.ipc.open_file(source)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ShardError(f"{path} is not an Arrow IPC file: {exc}") from None
    raw = reader.schema.metadata or {}
    metadata = {k.decode(): v.decode() for k, v in raw.items()}
    if metadata.get("format") != FORMAT:
        raise ShardError(f"{path} is not a {FORMAT} shard (schema metadata format={metadata.get('format')!r})")
    if metadata.get("version") != str(VERSION):
        raise ShardError(f"{path} has shard format version {metadata.get('version')}, this code reads {VERSION}")
    if COLUMN not in reader.schema.names:
        raise ShardError(f"{path} has no `{COLUMN}` column (columns: {reader.schema.names})")
    chunks: list[np.ndarray] = []
    doc_offsets: list[np.ndarray] = []
    for i in range(reader.num_record_batches):
        column = reader.get_batch(i).column(COLUMN)
        offsets = column.offsets.to_numpy()
        values = column.values.to_numpy(zero_copy_only=True)[offsets[0] : offsets[-1]]
        chunks.append(values)
        doc_offsets.append(offsets - offsets[0])
    return ShardView(path, metadata, chunks, doc_offsets, source)


# ---- manifest --------------------------------------------------------------------------------------------------


def build_manifest(metadata: dict[str, str], entries: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The manifest from every task's shard entries. Shards are sorted by path so it is the same on every run."""
    splits = {}
    for split in SPLITS:
        shards = sorted(entries.get(split, []), key=lambda e: e["path"])
        splits[split] = {
            "docs": sum(s["docs"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
            "bytes": sum(s["bytes"] for s in shards),
            "shards": shards,
        }
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "tokenizer_sha256": metadata["tokenizer_sha256"],
        "vocab_size": int(metadata["vocab_size"]),
        "eot_id": int(metadata["eot_id"]),
        "dtype": metadata["dtype"],
        "splits": splits,
    }
    names = sorted({s["source"] for split in splits.values() for s in split["shards"] if "source" in s})
    if names:  # data.sources: each shard entry names its source; the totals per source and split
        manifest["sources"] = {name: {split: {key: sum(s[key] for s in info["shards"] if s.get("source") == name)
                                              for key in ("docs", "tokens", "bytes")}
                                      for split, info in splits.items()} for name in names}
    return manifest


def write_manifest(shards_dir: str | Path, manifest: dict[str, Any]) -> Path:
    path = Path(shards_dir) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_manifest(shards_dir: str | Path) -> dict[str, Any]:
    path = Path(shards_dir) / MANIFEST
    if not path.is_file():
        raise ShardError(f"no {MANIFEST} in {shards_dir}: run `scratchgpt shard CONFIG` first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ShardError(f"{path} is not valid JSON: {exc}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ShardError(f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}, "
                         f"expected {FORMAT!r} version {VERSION}")
    missing = [k for k in ("tokenizer_sha256", "vocab_size", "eot_id", "dtype", "splits") if k not in manifest]
    if missing:
        raise ShardError(f"{path} lacks the keys {missing}")
    return manifest


def manifest_sha256(shards_dir: str | Path) -> str:
    return file_sha256(Path(shards_dir) / MANIFEST)

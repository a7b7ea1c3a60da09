"""Readers that account for every input record.

datatrove's own readers skip a malformed line with a log warning. Here every
record that cannot become a document (bad JSON, invalid UTF-8, a truncated
`.gz`/`.zst`, an empty file, no text) is counted and written aside with its
file, line and reason, or, in strict mode, stops the run naming file and line.

Formats, by file name: `.jsonl`/`.json`/`.ndjson` (plain, `.gz`, `.zst`),
`.parquet`, `.txt` (cut into documents at blank lines, see `split_text`, or one
document per file), `.warc`/`.warc.gz` (HTML responses; the text is extracted later
by `dataprep.html.HtmlExtractor`).
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.readers.base import BaseDiskReader
from datatrove.pipeline.readers.jsonl import JsonlReader
from datatrove.pipeline.writers.disk_base import DiskWriter

from dataprep.errors import ScratchgptError

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSIONS = (".gz", ".zst")
CHUNK = 1 << 20
IN_CHUNK = 1 << 16  # compressed bytes per step: a truncation loses at most the lines after it


class MalformedRecordError(ScratchgptError, ValueError):
    """A malformed input record in strict mode; the message is `file:line: reason`."""


def input_format(path: str) -> str:
    """`json`, `parquet`, `txt` or `warc` from the file name; ValueError for anything else."""
    name = path.lower()
    for comp in COMPRESSIONS:
        if name.endswith(comp):
            name = name[: -len(comp)]
            break
    if name.endswith(JSON_SUFFIXES):
        return "json"
    if name.endswith(".warc"):
        return "warc"
    if name.endswith(".parquet") and not path.lower().endswith(COMPRESSIONS):
        return "parquet"
    if name.endswith(".txt") and not path.lower().endswith(COMPRESSIONS):
        return "txt"
    raise ValueError(
        f"{path}: unknown input format (expected .jsonl/.json[.gz|.zst], .parquet, .txt or .warc[.gz])"
    )


def _member_chunks(f, new_decompressor, error: type[Exception], kind: str) -> Iterator[bytes]:
    """Decompressed chunks of a file of concatenated frames/members; EOFError when it ends inside one.

    Neither library says so at a truncation: zstandard's stream reader returns a short read without
    complaint, and gzip.GzipFile.read raises but drops what it had decompressed in that call. Feeding
    the decompressor piece by piece keeps every complete line before the cut, and the end-of-frame
    flag tells a truncated file from a whole one.
    """
    dobj = new_decompressor()
    fed = False
    while buf := f.read(IN_CHUNK):
        while buf:
            if dobj.eof:
                dobj = new_decompressor()
            try:
                out = dobj.decompress(buf)
            except error as exc:
                raise OSError(f"corrupt {kind} data: {exc}") from None
            fed = True
            if out:
                yield out
            buf = dobj.unused_data if dobj.eof else b""
    if fed and not dobj.eof:
        raise EOFError(f"{kind} stream ends in the middle of a frame (truncated file?)")


def _zstd_chunks(f) -> Iterator[bytes]:
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    return _member_chunks(f, dctx.decompressobj, zstandard.ZstdError, "zstd")


def _gzip_chunks(f) -> Iterator[bytes]:
    return _member_chunks(f, lambda: zlib.decompressobj(16 + zlib.MAX_WBITS), zlib.error, "gzip")


def _byte_chunks(path: str) -> Iterator[bytes]:
    """The file's decompressed bytes in chunks; EOFError/OSError on a truncated or corrupt stream."""
    if path.endswith(".gz"):
        with open(path, "rb") as f:
            yield from _gzip_chunks(f)
    elif path.endswith(".zst"):
        with open(path, "rb") as f:
            yield from _zstd_chunks(f)
    else:
        with open(path, "rb") as f:
            while buf := f.read(CHUNK):
                yield buf


class _ChunkStream(io.RawIOBase):
    """A read-only file over an iterator of byte chunks (errors of the iterator surface on read)."""

    def __init__(self, chunks: Iterator[bytes]):
        self._chunks = chunks
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._buf:
            self._buf = next(self._chunks, b"")
            if not self._buf:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Split a chunk stream on b"\\n" (a last line without newline included)."""
    rest = b""
    for chunk in chunks:
        parts = (rest + chunk).split(b"\n")
        rest = parts.pop()
        yield from parts
    if rest:
        yield rest


def _paragraphs(lines: list[str]) -> list[tuple[int, int]]:
    """(first, stop) line ranges of the runs of non-blank lines; every line on its own if there is only one run."""
    runs, start = [], None
    for i, line in enumerate([*lines, ""]):
        if line.strip() and start is None:
            start = i
        elif not line.strip() and start is not None:
            runs.append((start, i))
            start = None
    if len(runs) == 1:  # no blank line between text: cut at line ends
        first, stop = runs[0]
        return [(i, i + 1) for i in range(first, stop)]
    return runs


def split_text(text: str, max_chars: int) -> list[tuple[str, str]]:
    """A text file as documents of at most `max_chars` characters: (id suffix, text) pairs.

    Paragraphs (runs of lines between blank lines) are packed in order into
    documents up to `max_chars`; a paragraph longer than that is cut at line
    ends, and a line longer than that every `max_chars` characters. A text
    without blank lines is cut at line ends. Each document is a slice of the
    original text (from its first to its last line, blank lines between kept),
    and its id suffix is its first line number (`12`, or `12@40000` for a piece
    cut inside line 12 at character 40000).
    """
    lines = text.split("\n")
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line) + 1)
    pieces: list[tuple[str, int, int]] = []  # (suffix, start, end) in characters, each at most max_chars long

    def add(first: int, stop: int) -> None:
        begin, end = starts[first], starts[stop] - 1
        if end - begin <= max_chars:
            pieces.append((str(first + 1), begin, end))
        elif stop - first > 1:
            for i in range(first, stop):
                add(i, i + 1)
        else:
            for at in range(begin, end, max_chars):
                suffix = str(first + 1) if at == begin else f"{first + 1}@{at - begin}"
                pieces.append((suffix, at, min(at + max_chars, end)))

    for first, stop in _paragraphs(lines):
        add(first, stop)
    docs: list[tuple[str, str]] = []
    group: list[tuple[str, int, int]] = []
    for piece in pieces:
        if group and piece[2] - group[0][1] > max_chars:
            docs.append((group[0][0], text[group[0][1] : group[-1][2]]))
            group = []
        group.append(piece)
    if group:
        docs.append((group[0][0], text[group[0][1] : group[-1][2]]))
    return docs


class InputReader(BaseDiskReader):
    """Reads the configured input files (any mix of formats), sharded between tasks by file.

    Each record counts as one document in: it becomes a `Document` with id from
    `id_key` (else `<file>:<line>`), or it is set aside in `removed_writer` with
    metadata `file`, `line`, `reason` (or raises `MalformedRecordError` when strict).
    Stats: `docs_in`, `bytes_in` (UTF-8 bytes of what was read), `malformed`.
    """

    name = "scratchgpt inputs"

    def __init__(
        self,
        files: list[str],
        text_key: str = "text",
        id_key: str = "id",
        strict: bool = False,
        removed_writer: DiskWriter | None = None,
        file_progress: bool = False,
        txt_split: str = "file",
        txt_max_chars: int = 20_000,
    ):
        super().__init__(
            data_folder="/", text_key=text_key, id_key=id_key, add_file_path=False, file_progress=file_progress
        )
        for path in files:
            input_format(path)  # unknown suffixes fail when the plan is built, before any work
        self.files = list(files)
        self.strict = strict
        self.txt_split = txt_split  # "paragraphs" (see split_text) or "file" (one document per file)
        self.txt_max_chars = txt_max_chars
        self.removed_writer = removed_writer
        self._writer_open = False

    # --- accounting -------------------------------------------------------------------------
    def _malformed(self, path: str, line: int, reason: str, raw: bytes | str = b"", rank: int = 0) -> None:
        if self.strict:
            raise MalformedRecordError(f"{path}:{line}: {reason}")
        text = raw if isinstance(raw, str) else raw.decode("utf-8", errors="backslashreplace")
        self.stat_update("docs_in", "malformed")
        self.stat_update("bytes_in", value=len(raw if isinstance(raw, bytes) else raw.encode("utf-8", "replace")))
        if self.removed_writer is not None:
            doc = Document(
                text=text,
                id=f"{path}:{line}",
                metadata={"file": path, "line": line, "reason": reason, "removed_by": "malformed"},
            )
            self.removed_writer.write(doc, rank)

    def _make_document(self, record: Any, path: str, line: int, rank: int) -> Document | None:
        if not isinstance(record, dict):
            self._malformed(path, line, f"not a JSON object (got {type(record).__name__})", str(record), rank)
            return None
        if self.text_key not in record:
            keys = ", ".join(sorted(map(str, record))[:10])
            self._malformed(path, line, f"no text key {self.text_key!r} (keys: {keys})", _dump(record), rank)
            return None
        text = record.pop(self.text_key)
        if not isinstance(text, str):
            self._malformed(path, line, f"text key {self.text_key!r} is {type(text).__name__}, not a string",
                            _dump({self.text_key: text, **record}), rank)
            return None
        if not text.strip():
            self._malformed(path, line, "empty text", _dump({self.text_key: text, **record}), rank)
            return None
        doc_id = record.pop(self.id_key, None)
        doc_id = f"{path}:{line}" if doc_id is None or doc_id == "" else str(doc_id)
        metadata = record.pop("metadata", None)
        if not isinstance(metadata, dict):
            metadata = {} if metadata is None else {"metadata": metadata}
        metadata.update(record)
        metadata.setdefault("file_path", path)
        self.stat_update("docs_in")
        # bytes of the text itself (not of the whole JSON line), so bytes_in and bytes_out compare
        self.stat_update("bytes_in", value=len(text.encode("utf-8", "replace")))
        return Document(text=text, id=doc_id, metadata=metadata)

    # --- formats ------------------------------------------------------------------------------
    def _read_json(self, path: str, rank: int) -> DocumentsPipeline:
        import orjson

        line_no = 0
        records = 0
        try:
            chunks = _byte_chunks(path)
            first = next(chunks, b"")
            if first.lstrip()[:1] == b"[" and path.lower().removesuffix(".gz").removesuffix(".zst").endswith(".json"):
                yield from self._read_json_array(path, first + b"".join(chunks), rank)
                return
            for line_no, raw in enumerate(_lines(_prepend(first, chunks)), start=1):
                if not raw.strip():
                    continue  # blank lines separate nothing and carry nothing
                records += 1
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    self._malformed(path, line_no, f"invalid UTF-8 at byte {exc.start}", raw, rank)
                    continue
                try:
                    record = orjson.loads(raw)
                except orjson.JSONDecodeError as exc:
                    self._malformed(path, line_no, f"malformed JSON: {exc}", raw, rank)
                    continue
                doc = self._make_document(record, path, line_no, rank)
                if doc is not None:
                    yield doc
        except (EOFError, OSError) as exc:
            records += 1
            self._malformed(path, line_no + 1, f"truncated or corrupt file after line {line_no}: {exc}", b"", rank)
        if records == 0:
            self._malformed(path, 0, "empty file: no records", b"", rank)

    def _read_json_array(self, path: str, data: bytes, rank: int) -> DocumentsPipeline:
        import orjson

        try:
            records = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            self._malformed(path, 1, f"malformed JSON array: {exc}", data[:10_000], rank)
            return
        if not records:
            self._malformed(path, 0, "empty file: empty JSON array", b"", rank)
        for i, record in enumerate(records, start=1):
            doc = self._make_document(record, path, i, rank)
            if doc is not None:
                yield doc

    def _read_parquet(self, path: str, rank: int) -> DocumentsPipeline:
        import pyarrow.parquet as pq

        row = 0
        try:
            pf = pq.ParquetFile(path)
            for batch in pf.iter_batches(batch_size=1024):
                for record in batch.to_pylist():
                    row += 1
                    doc = self._make_document(record, path, row, rank)
                    if doc is not None:
                        yield doc
        except Exception as exc:  # pyarrow raises several types for a damaged file
            if isinstance(exc, MalformedRecordError):
                raise
            self._malformed(path, row + 1, f"unreadable parquet after row {row}: {exc}", b"", rank)
            return
        if row == 0:
            self._malformed(path, 0, "empty file: no rows", b"", rank)

    def _read_txt(self, path: str, rank: int) -> DocumentsPipeline:
        raw = Path(path).read_bytes()
        if not raw.strip():
            self._malformed(path, 0, "empty file", raw, rank)
            return
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            self._malformed(path, line, f"invalid UTF-8 at byte {exc.start}", raw, rank)
            return
        if self.txt_split == "file":
            parts = [(path, text)]
        else:
            parts = [(f"{path}:{suffix}", part) for suffix, part in split_text(text, self.txt_max_chars)]
        for doc_id, part in parts:
            doc = self._make_document({self.text_key: part, self.id_key: doc_id}, path, 1, rank)
            if doc is not None:
                yield doc

    def _read_warc(self, path: str, rank: int) -> DocumentsPipeline:
        from datatrove.pipeline.readers.warc import process_record
        from warcio.archiveiterator import ArchiveIterator

        index = 0
        responses = 0
        try:
            # warcio stops quietly at a truncated gzip member; our decompressor raises there instead
            with io.BufferedReader(_ChunkStream(_byte_chunks(path)), CHUNK) as f:
                for index, record in enumerate(ArchiveIterator(f), start=1):
                    extracted = process_record(record)
                    if not extracted:
                        continue  # requests, metadata and non-HTML payloads are not documents
                    responses += 1
                    html = extracted.pop("text")
                    extracted["html"] = True  # tells HtmlExtractor to turn this into text
                    record_id = extracted.pop("id")
                    extracted.update({self.text_key: html, self.id_key: record_id})  # the WARC-Record-ID
                    doc = self._make_document(extracted, path, index, rank)
                    if doc is not None:
                        yield doc
        except Exception as exc:  # warcio raises ArchiveLoadFailed, EOFError, zlib errors
            if isinstance(exc, MalformedRecordError):
                raise
            self._malformed(path, index + 1, f"truncated or corrupt WARC after record {index}: {exc}", b"", rank)
            return
        if index == 0:
            self._malformed(path, 0, "empty file: no WARC records", b"", rank)

    # --- datatrove hooks ------------------------------------------------------------------------
    def read_file(self, filepath: str) -> DocumentsPipeline:
        fmt = input_format(filepath)
        reader = {"json": self._read_json, "parquet": self._read_parquet, "txt": self._read_txt,
                  "warc": self._read_warc}[fmt]
        yield from reader(filepath, self._rank)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        self._rank = rank
        shard = self.files[rank::world_size]
        writer = self.removed_writer
        try:
            for doc in self.read_files_shard(shard):
                self.update_doc_stats(doc)
                yield doc
        finally:
            if writer is not None:
                writer.close()


def _prepend(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    if first:
        yield first
    yield from rest


def _dump(record: Any) -> str:
    import orjson

    try:
        return orjson.dumps(record).decode()
    except TypeError:
        return repr(record)


class TaskFileReader(JsonlReader):
    """Reads exactly this task's `<rank>.jsonl.zst` from an earlier sub-stage.

    Dedup steps address documents by (task, position), so a task must read back
    the very file it wrote, even when another task wrote nothing.
    """

    name = "scratchgpt task file"

    def __init__(self, folder: str):
        super().__init__(folder, compression="zstd", add_file_path=False)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        name = f"{rank:05d}.jsonl.zst"
        if not self.data_folder.isfile(name):
            return
        for doc in self.read_files_shard([name]):
            self.update_doc_stats(doc)
            yield doc

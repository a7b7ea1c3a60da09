"""Readers: every format, ids, and every bad-input path (counted and set aside, or strict errors)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from dataprep.readers import InputReader, MalformedRecordError, TaskFileReader, input_format
from dataprep.removed import RemovedWriter

WEB = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "web"


def read(files: list[str], tmp_path: Path, strict: bool = False, **kw) -> tuple[list, list[dict], dict]:
    """Run the reader as datatrove would for one task; return docs, set-aside records and stats."""
    removed = tmp_path / "removed"
    reader = InputReader([str(f) for f in files], strict=strict, removed_writer=RemovedWriter(removed, "malformed"),
                         **kw)
    docs = list(reader.run(None, rank=0, world_size=1))
    records = []
    for path in sorted((removed / "malformed").glob("*.jsonl.zst")):
        text = zstandard.ZstdDecompressor().stream_reader(path.open("rb")).read().decode()
        records += [json.loads(line) for line in text.splitlines()]
    stats = {k: (v if isinstance(v, int) else v["total"]) for k, v in reader.stats.to_dict()["stats"].items()}
    return docs, records, stats


def jsonl(rows: list) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


ROWS = [{"id": f"d{i}", "text": f"document number {i} has some words", "lang": "en"} for i in range(5)]


@pytest.mark.parametrize("name,compress", [
    ("a.jsonl", lambda b: b), ("a.jsonl.gz", gzip.compress), ("a.json.zst", zstandard.ZstdCompressor().compress),
])
def test_jsonl_plain_gz_zst(tmp_path: Path, name: str, compress) -> None:
    path = tmp_path / name
    path.write_bytes(compress(jsonl(ROWS)))
    docs, removed, stats = read([path], tmp_path)
    assert [d.id for d in docs] == [r["id"] for r in ROWS]
    assert docs[2].text == ROWS[2]["text"]
    assert docs[2].metadata["lang"] == "en"  # other fields travel as metadata
    assert removed == [] and stats["docs_in"] == 5 and "malformed" not in stats


def test_json_array_file_and_missing_ids_become_file_line(tmp_path: Path) -> None:
    path = tmp_path / "arr.json"
    path.write_text(json.dumps([{"text": "first document text"}, {"text": "second document text"}]))
    docs, removed, _ = read([path], tmp_path)
    assert [d.id for d in docs] == [f"{path}:1", f"{path}:2"]
    assert removed == []


def test_custom_text_and_id_keys(tmp_path: Path) -> None:
    path = tmp_path / "k.jsonl"
    path.write_bytes(jsonl([{"url": "http://x/1", "content": "hello there world"}, {"content": "no url here"}]))
    docs, _, _ = read([path], tmp_path, text_key="content", id_key="url")
    assert [d.id for d in docs] == ["http://x/1", f"{path}:2"]


def test_parquet(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"id": ["p1", "p2"], "text": ["parquet doc one", "parquet doc two"], "n": [1, 2]}), path)
    docs, removed, _ = read([path], tmp_path)
    assert [(d.id, d.text, d.metadata["n"]) for d in docs] == [("p1", "parquet doc one", 1),
                                                               ("p2", "parquet doc two", 2)]
    assert removed == []


def test_txt_is_one_document_per_file(tmp_path: Path) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("line one\nline two\n")
    b.write_text("another file")
    docs, _, _ = read([a, b], tmp_path)
    assert [(d.id, d.text) for d in docs] == [(str(a), "line one\nline two\n"), (str(b), "another file")]


def test_warc_gz_from_shared_data_gives_html_documents_with_record_ids() -> None:
    warc = WEB / "warc" / "sample-0000.warc.gz"
    reader = InputReader([str(warc)])
    docs = list(reader.run(None, 0, 1))
    assert 10 <= len(docs) <= 22  # the HTML responses among 22 responses
    assert all(d.id.startswith("<urn:uuid:") for d in docs)
    assert all(d.metadata["html"] is True and "<" in d.text for d in docs)
    assert all(d.metadata["url"].startswith("http") for d in docs)


def test_shared_web_jsonl_and_c4_json_gz_mixed(tmp_path: Path) -> None:
    files = [WEB / "cleanportaleval.jsonl", *sorted((WEB / "c4").glob("*.json.gz"))]
    docs, removed, stats = read(files, tmp_path)
    assert len(docs) == 71 + 30 and removed == []
    assert docs[0].id == "CleanPortalEval-master/bbc.co.uk_news_01"
    assert docs[-1].id == f"{files[-1]}:{sum(1 for d in docs if d.metadata['file_path'] == str(files[-1]))}"
    assert stats["bytes_in"] == sum(len(d.text.encode()) for d in docs)


def test_malformed_json_line_is_set_aside_and_the_rest_is_read(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(jsonl(ROWS[:2]) + b'{"id": "broken", "text": "unterminated\n' + jsonl(ROWS[2:]))
    docs, removed, stats = read([path], tmp_path)
    assert [d.id for d in docs] == [r["id"] for r in ROWS]
    assert len(removed) == 1
    rec = removed[0]
    assert rec["id"] == f"{path}:3"
    assert rec["metadata"]["file"] == str(path) and rec["metadata"]["line"] == 3
    assert rec["metadata"]["reason"].startswith("malformed JSON")
    assert '"unterminated' in rec["text"]  # the raw line is kept: nothing lost
    assert stats["docs_in"] == 6 and stats["malformed"] == 1


def test_malformed_line_in_strict_mode_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(jsonl(ROWS[:2]) + b"{nope\n")
    with pytest.raises(MalformedRecordError, match=rf"{path}:3: malformed JSON"):
        read([path], tmp_path, strict=True)


def test_invalid_utf8_line_is_set_aside_with_its_bytes(tmp_path: Path) -> None:
    path = tmp_path / "latin.jsonl"
    path.write_bytes(jsonl(ROWS[:1]) + '{"text": "caf\u00e9"}\n'.encode("latin-1") + jsonl(ROWS[1:2]))
    docs, removed, _ = read([path], tmp_path)
    assert [d.id for d in docs] == ["d0", "d1"]
    assert removed[0]["metadata"]["line"] == 2
    assert "invalid UTF-8" in removed[0]["metadata"]["reason"]
    assert "caf\\xe9" in removed[0]["text"]


def test_invalid_utf8_txt(tmp_path: Path) -> None:
    path = tmp_path / "x.txt"
    path.write_bytes(b"fine line\nbad \xff byte\n")
    docs, removed, _ = read([path], tmp_path)
    assert docs == [] and removed[0]["metadata"]["line"] == 2
    assert "invalid UTF-8" in removed[0]["metadata"]["reason"]


@pytest.mark.parametrize("suffix,compress", [(".jsonl.gz", gzip.compress),
                                             (".jsonl.zst", zstandard.ZstdCompressor().compress)])
def test_truncated_compressed_file_keeps_what_was_read(tmp_path: Path, suffix: str, compress) -> None:
    # over several zstd blocks (128 KiB each): a cut inside the first block leaves nothing to keep
    rows = [{"id": f"r{i}", "text": f"row {i} " + "filler words " * 20} for i in range(3000)]
    blob = compress(jsonl(rows))
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(blob[: len(blob) * 2 // 3])
    docs, removed, stats = read([path], tmp_path)
    assert 0 < len(docs) < 3000
    assert [d.id for d in docs] == [f"r{i}" for i in range(len(docs))]  # everything before the cut
    assert len(removed) == 1 and "truncated" in removed[0]["metadata"]["reason"]
    assert stats["docs_in"] == len(docs) + 1
    with pytest.raises(MalformedRecordError, match=rf"{path}:\d+: truncated"):
        read([path], tmp_path / "strict", strict=True)


def test_truncated_warc_gz_is_reported(tmp_path: Path) -> None:
    blob = (WEB / "warc" / "sample-0001.warc.gz").read_bytes()
    path = tmp_path / "cut.warc.gz"
    path.write_bytes(blob[: len(blob) // 2])
    docs, removed, _ = read([path], tmp_path)
    assert len(docs) >= 1
    assert len(removed) == 1 and "truncated or corrupt WARC" in removed[0]["metadata"]["reason"]


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.jsonl.gz", "empty.txt", "empty.parquet"])
def test_empty_file_is_counted_and_named(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if name.endswith(".gz"):
        path.write_bytes(gzip.compress(b""))
    elif name.endswith(".parquet"):
        pq.write_table(pa.table({"text": pa.array([], pa.string())}), path)
    else:
        path.write_bytes(b"")
    docs, removed, stats = read([path], tmp_path)
    assert docs == []
    assert removed[0]["metadata"]["file"] == str(path) and "empty" in removed[0]["metadata"]["reason"]
    assert stats["malformed"] == 1
    with pytest.raises(MalformedRecordError, match="empty"):
        read([path], tmp_path / "strict", strict=True)


def test_record_without_text_key_or_with_bad_text(tmp_path: Path) -> None:
    path = tmp_path / "k.jsonl"
    path.write_bytes(jsonl([{"id": "a", "body": "x"}, {"id": "b", "text": 12}, {"id": "c", "text": "  "},
                            [1, 2], {"id": "d", "text": "good one"}]))
    docs, removed, _ = read([path], tmp_path)
    assert [d.id for d in docs] == ["d"]
    reasons = [r["metadata"]["reason"] for r in removed]
    assert reasons[0].startswith("no text key 'text' (keys: body, id)")
    assert "is int, not a string" in reasons[1]
    assert reasons[2] == "empty text"
    assert reasons[3].startswith("not a JSON object")
    assert [r["metadata"]["line"] for r in removed] == [1, 2, 3, 4]
    with pytest.raises(MalformedRecordError, match=rf"{path}:1: no text key"):
        read([path], tmp_path / "strict", strict=True)


def test_files_are_sharded_between_tasks(tmp_path: Path) -> None:
    files = []
    for i in range(3):
        files.append(tmp_path / f"{i}.jsonl")
        files[-1].write_bytes(jsonl([{"id": f"f{i}", "text": "some text"}]))
    reader = InputReader([str(f) for f in files])
    ids = [[d.id for d in reader.run(None, rank, 2)] for rank in range(2)]
    assert ids == [["f0", "f2"], ["f1"]]


def test_unknown_suffix_is_refused_up_front() -> None:
    with pytest.raises(ValueError, match="unknown input format"):
        input_format("data.csv")
    with pytest.raises(ValueError, match="notes.docx"):
        InputReader(["notes.docx"])


def test_task_file_reader_reads_only_its_rank(tmp_path: Path) -> None:
    for rank in (0, 2):
        blob = jsonl([{"id": f"r{rank}", "text": "t", "metadata": {"k": rank}}])
        (tmp_path / f"{rank:05d}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(blob))
    reader = TaskFileReader(str(tmp_path))
    assert [d.id for d in reader.run(None, 2, 3)] == ["r2"]
    assert list(reader.run(None, 1, 3)) == []  # rank 1 wrote nothing: nothing shifts

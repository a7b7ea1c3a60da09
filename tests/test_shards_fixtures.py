"""Fixtures shared by the tokenizer, shard and loader tests: real documents, prep output, small shard sets.

Holds no tests itself. Documents come from ../shared/data plus strings built here
(Chinese, emoji, code, control characters) that the shared data lacks.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

BUILT_STRINGS = [
    "中文测试：你好，世界！机器学习是人工智能的一个分支。",
    "日本語のテキストと한국어 텍스트, and Ελληνικά, русский, עברית, العربية.",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 zero-width\u200bjoiner and a lone combining mark e\u0301",
    "def tokenize(text: str) -> list[int]:\n\treturn [ord(c) for c in text]  # ≥ 0\n\n\n    x = {'a': 1}\r\n",
    "  leading and trailing spaces   \n\n\t\ttabs\x00nul\x7fdel\u2028line-sep",
    "a document that mentions <|endoftext|> in its text",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 outside the BMP: 𐍈 𝄞 🀄",
]


def jsonl_texts(path: Path, key: str = "text") -> list[tuple[str, str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    out = []
    with opener(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            record = json.loads(line)
            if isinstance(record.get(key), str) and record[key]:
                out.append((str(record.get("id", record.get("url", f"{path.name}:{i}"))), record[key]))
    return out


def web_documents() -> list[dict[str, str]]:
    """The crawled-web documents of the shared data (a few MB), with their ids."""
    docs = []
    for path in sorted((SHARED / "web").glob("*.jsonl")) + sorted((SHARED / "web" / "ccnet").glob("*.jsonl")):
        docs += [{"id": f"{path.name}/{i}", "text": t} for i, t in jsonl_texts(path)]
    for path in sorted((SHARED / "web" / "c4").glob("*.json.gz")):
        docs += [{"id": f"{path.name}/{i}", "text": t} for i, t in jsonl_texts(path)]
    docs += [{"id": f"built/{i}", "text": t} for i, t in enumerate(BUILT_STRINGS)]
    return docs


def all_shared_texts() -> list[str]:
    """Every text in the shared data, for the round-trip test: plain text, web text and gold text, HTML, TSV."""
    texts = [(SHARED / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")]
    for path in sorted((SHARED / "web").glob("*.jsonl")) + sorted((SHARED / "web" / "ccnet").glob("*.jsonl")):
        texts += [t for _, t in jsonl_texts(path)] + [t for _, t in jsonl_texts(path, "gold_text")]
    for path in sorted((SHARED / "web" / "c4").glob("*.json.gz")):
        texts += [t for _, t in jsonl_texts(path)]
    for path in sorted((SHARED / "web" / "raw_html").glob("*.jsonl.gz")):
        texts += [t for _, t in jsonl_texts(path, "html")]
    for path in sorted((SHARED / "web" / "warc").glob("*.warc.gz")):
        texts.append(gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace"))
    for path in sorted((SHARED / "sst2").glob("*.tsv")):
        texts.append(path.read_text(encoding="utf-8"))
    return texts + BUILT_STRINGS


def write_prep_output(workdir: Path, docs: list[dict[str, str]], files: int = 2) -> Path:
    """`<workdir>/prep/output/0000k.jsonl.zst` as the prep stage writes them (datatrove JsonlWriter's layout)."""
    import zstandard

    out = Path(workdir) / "prep" / "output"
    out.mkdir(parents=True, exist_ok=True)
    for k in range(files):
        lines = "".join(json.dumps({"text": d["text"], "id": d["id"], "metadata": {}}) + "\n" for d in docs[k::files])
        (out / f"{k:05d}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode("utf-8")))
    return out


def write_token_shards(shards_dir: Path, split_docs: dict[str, list[np.ndarray]], vocab_size: int = 1000,
                       eot: int = 0, tokenizer_hash: str = "f" * 64, max_shard_bytes: int = 1 << 20,
                       docs_per_batch: int = 7) -> dict:
    """Shards of given token documents (eot appended here), written with the real ShardWriter and manifest."""
    from dataprep.shards import ShardWriter, build_manifest, pack_documents, shard_metadata, write_manifest

    meta = shard_metadata(tokenizer_hash, vocab_size, eot)
    entries = {}
    for split, docs in split_docs.items():
        writer = ShardWriter(shards_dir, split, "t-00000", meta, max_shard_bytes)
        for i in range(0, len(docs), docs_per_batch):
            part = [d.tolist() for d in docs[i : i + docs_per_batch]]
            writer.write(pack_documents(part, [2 * len(d) for d in part], eot, meta["dtype"]))
        entries[split] = writer.close()
    manifest = build_manifest(meta, entries)
    write_manifest(shards_dir, manifest)
    return manifest


def random_documents(n: int, seed: int = 0, vocab_size: int = 1000, max_len: int = 300) -> list[np.ndarray]:
    """Token documents without the end-of-text id (0): ids 1..vocab_size-1."""
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab_size, size=int(rng.integers(1, max_len))) for _ in range(n)]

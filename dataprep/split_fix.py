"""Both splits non-empty whenever `shards.val_fraction > 0`, however few the documents.

The hash split decides each document on its own, so a small corpus can leave a
split empty (21 documents at val_fraction 0.2: none in val happens). After the
shard tasks have written their part files and before they are merged, this
moves the tail of the full split's token stream (manifest order, the order the
loader reads) into the empty one: the last documents, about `val_fraction` of
them, or, for a single document, the last `val_fraction` of its tokens. The
part files are rewritten to match, so a rerun of the merge (resume) sees the
moved shards, and the note it returns says how the split was cut.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from dataprep.shard_step import PARTS_DIR, read_parts
from dataprep.shards import DocBatch, ShardWriter, open_shard

FIX_SOURCE = "split-fix"


def token_byte_lengths(tokenizer_dir: str | Path) -> np.ndarray:
    """UTF-8 bytes behind each token id: a byte-level BPE token string has one character per byte."""
    from dataprep.tokenizer import eot_id, load_tokenizer

    tok = load_tokenizer(str(tokenizer_dir))
    lengths = np.array([len(tok.id_to_token(i) or "") for i in range(tok.get_vocab_size())], dtype=np.int64)
    lengths[eot_id(tok)] = 0
    return lengths


def _batch(docs: list[np.ndarray], lengths: np.ndarray, dtype: str) -> DocBatch:
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum([len(d) for d in docs], out=offsets[1:])
    values = np.concatenate(docs).astype(dtype) if docs else np.zeros(0, dtype=dtype)
    text_bytes = np.array([int(lengths[d].sum()) for d in docs], dtype=np.int64)
    return DocBatch(values, offsets, text_bytes)


def _write_part(shards_dir: Path, name: str, part: dict[str, Any]) -> None:
    path = shards_dir / PARTS_DIR / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(part, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def ensure_both_splits(shards_dir: str | Path, tokenizer_dir: str | Path, val_fraction: float,
                       max_shard_bytes: int = 256 * 2**20, compression: str = "none",
                       data_source: str | None = None) -> str:
    """Fill an empty split from the tail of the other; returns how the split was cut (for the summary).

    `data_source`: only that source's shards (data.sources: every source gets both splits)."""
    shards_dir = Path(shards_dir)
    how = f"by a hash of each document id (val_fraction {val_fraction})"
    parts = [p for p in read_parts(shards_dir) if p.get("data_source") == data_source]
    fix_name = FIX_SOURCE if data_source is None else f"{FIX_SOURCE}-{data_source}"
    if val_fraction <= 0 or not parts:
        return how
    done = [p["note"] for p in parts if p["source"] == FIX_SOURCE]
    if done:  # an earlier run of this stage moved documents already (resume)
        return done[0]
    docs = {s: sum(e["docs"] for p in parts for e in p["shards"].get(s, [])) for s in ("train", "val")}
    if docs["train"] and docs["val"]:
        return how
    src, dst = ("train", "val") if not docs["val"] else ("val", "train")
    if not docs[src]:
        return how
    share = val_fraction if dst == "val" else 1 - val_fraction  # what dst should hold
    metadata = parts[0]["metadata"]
    dtype, eot = metadata["dtype"], int(metadata["eot_id"])
    lengths = token_byte_lengths(tokenizer_dir)
    owner = {e["path"]: (i, e) for i, p in enumerate(parts) for e in p["shards"].get(src, [])}
    stream = sorted(owner)  # manifest order

    if docs[src] == 1:
        (view,) = [open_shard(shards_dir / path) for path in stream if owner[path][1]["docs"]]
        tokens = np.asarray(view.documents()[0])
        if len(tokens) < 3:
            return how
        cut = min(len(tokens) - 2, max(1, len(tokens) - 1 - math.ceil(share * (len(tokens) - 1))))
        keep_docs = [np.append(tokens[:cut], eot).astype(dtype)]
        moved = [tokens[cut:]]
        affected = {str(Path(view.path).relative_to(shards_dir)): keep_docs}
        note = (f"{how}; the {src} split was one document and the {dst} split empty, so the last "
                f"{len(tokens) - cut} of its {len(tokens)} tokens went to {dst}")
    else:
        n_move = max(1, min(docs[src] - 1, round((1 - share) * docs[src] if dst == "train" else share * docs[src])))
        moved, affected = [], {}
        for path in reversed(stream):
            if len(moved) >= n_move:
                break
            documents = [np.asarray(d) for d in open_shard(shards_dir / path).documents()]
            take = min(n_move - len(moved), len(documents))
            moved = documents[len(documents) - take:] + moved
            affected[path] = documents[: len(documents) - take]
        note = (f"{how}; the {dst} split came out empty, so the last {len(moved)} of {docs[src]} {src} "
                f"documents went to {dst}")

    for path, kept in affected.items():  # rewrite the shards that gave documents away
        index, entry = owner[path]
        entries = parts[index]["shards"][src]
        slot = entries.index(entry)
        if kept:
            writer = ShardWriter(shards_dir, src, Path(path).name.removesuffix(".arrow") + "-kept", metadata,
                                 max_shard_bytes, compression)
            writer.write(_batch(kept, lengths, dtype))
            entries[slot : slot + 1] = writer.close()
        else:
            del entries[slot]
    writer = ShardWriter(shards_dir, dst, f"{fix_name}-{src}", metadata, max_shard_bytes, compression)
    writer.write(_batch(moved, lengths, dtype))
    fix = {"source": FIX_SOURCE, "rank": 0, "world_size": 1, "metadata": metadata,
           "shards": {dst: writer.close(), src: []}, "note": note}
    if data_source is not None:
        fix["data_source"] = data_source
    for part in {owner[p][0] for p in affected}:
        _write_part(shards_dir, f"{parts[part]['source']}-{parts[part]['rank']:05d}", parts[part])
    _write_part(shards_dir, fix_name, fix)
    for path in affected:
        (shards_dir / path).unlink()
    return note

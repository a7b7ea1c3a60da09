"""Where dropped documents go: `prep/removed/<step>/<rank>.jsonl.zst`, each with its id, step and reason."""

from __future__ import annotations

from pathlib import Path

from datatrove.data import Document
from datatrove.pipeline.writers.jsonl import JsonlWriter


class RemovedWriter(JsonlWriter):
    """A JsonlWriter for one step's dropped documents.

    Adds `metadata.removed_by` (the step) and `metadata.reason` (the filter's own
    reason where it gives one, else the step) so every record says why it left.
    """

    name = "removed"

    def __init__(self, removed_dir: str | Path, step: str, default_reason: str | None = None):
        super().__init__(str(Path(removed_dir) / step), output_filename="${rank}.jsonl.zst", compression="zstd")
        self.step = step
        self.default_reason = default_reason or step

    def _default_adapter(self, document: Document) -> dict:
        data = super()._default_adapter(document)
        metadata = dict(data.get("metadata") or {})
        metadata.setdefault("removed_by", self.step)
        metadata.setdefault("reason", metadata.pop("filter_reason", None) or self.default_reason)
        data["metadata"] = metadata
        data.setdefault("text", "")
        data["id"] = document.id
        return data

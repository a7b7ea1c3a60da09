"""HTML-to-text for WARC records with datatrove's Trafilatura extractor, accounting for every drop."""

from __future__ import annotations

import contextlib

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.extractors.base import ExtractorSandbox
from datatrove.pipeline.extractors.trafilatura import Trafilatura
from datatrove.pipeline.writers.disk_base import DiskWriter
from datatrove.utils.typeshelper import StatHints


class HtmlExtractor(Trafilatura):
    """Extracts the main text of documents marked `metadata.html` and passes all others through.

    datatrove's extractors drop a page that yields no text, times out or fails
    without a record; here each goes to `exclusion_writer` with its reason.
    """

    name = "html extraction"

    def __init__(self, exclusion_writer: DiskWriter | None = None, timeout: float = 5.0):
        super().__init__(favour_precision=True, timeout=timeout, deduplicate=True)
        self.exclusion_writer = exclusion_writer

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        with contextlib.ExitStack() as stack:
            writer = stack.enter_context(self.exclusion_writer) if self.exclusion_writer else None
            sandbox = None
            for doc in data:
                if not doc.metadata.pop("html", False):
                    yield doc
                    continue
                if sandbox is None:  # a helper process only when a task really has HTML
                    sandbox = stack.enter_context(ExtractorSandbox(timeout=self.timeout, warmup_text=""))
                self.stat_update(StatHints.total)
                reason = None
                with self.track_time():
                    try:
                        text = sandbox.process_document(doc.text, self.extract)
                        if not text or not text.strip():
                            reason = "no main text found in the HTML"
                    except TimeoutError:
                        reason = f"extraction took over {self.timeout} s"
                    except EOFError:
                        reason = "extractor process died"
                    except Exception as exc:  # trafilatura/lxml errors on broken pages
                        reason = f"extraction failed: {exc}"
                if reason is None:
                    doc.text = text
                    self.stat_update(StatHints.forwarded)
                    yield doc
                else:
                    self.stat_update(StatHints.dropped)
                    doc.metadata["filter_reason"] = reason
                    if writer is not None:
                        writer.write(doc, rank)

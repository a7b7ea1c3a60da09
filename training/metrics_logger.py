"""Metric logging off the training hot path: the loop appends to a list, a thread sends batches to MLflow.

Only rank 0 logs (the others get a disabled logger). The time the loop spends
in `log` and the CPU time the sender thread uses are both counted, so the
cost of tracking can be reported as a fraction of training time.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

MAX_BATCH = 1000  # MLflow's log_batch limit on metrics per call


class MetricsLogger:
    def __init__(self, run_id: str | None, tracking_uri: str | None = None, flush_every_s: float = 5.0) -> None:
        self.enabled = run_id is not None
        self.run_id = run_id
        self.hot_path_s = 0.0
        self.sender_cpu_s = 0.0
        self.sent = 0
        self._queue: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._flush_every_s = flush_every_s
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if self.enabled:
            import mlflow

            self._client = mlflow.MlflowClient(tracking_uri)
            # Open the store here, once (for sqlite: the engine, the schema check): a start-up cost, not a per-step one.
            self._client.get_run(run_id)
            self._thread = threading.Thread(target=self._run, name="mlflow-metrics", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------ hot path

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Queue metrics for `step`; returns at once. Values must already be Python floats."""
        if not self.enabled:
            return
        start = time.perf_counter()
        self._queue.put(("metrics", (metrics, step, int(time.time() * 1000))))
        self.hot_path_s += time.perf_counter() - start

    def log_text(self, text: str, artifact_file: str) -> None:
        """Queue a text artifact (sample generations)."""
        if not self.enabled:
            return
        start = time.perf_counter()
        self._queue.put(("text", (text, artifact_file)))
        self.hot_path_s += time.perf_counter() - start

    # ------------------------------------------------------------ sender thread

    def _run(self) -> None:
        cpu_start = time.thread_time()
        while True:
            stopping = self._stop.wait(self._flush_every_s)
            try:
                self._drain()
            except BaseException as exc:  # keep the first error; training goes on, close() reports it
                self._error = self._error or exc
            self.sender_cpu_s = time.thread_time() - cpu_start
            if stopping:
                return

    def _drain(self) -> None:
        from mlflow.entities import Metric

        metrics: list[Metric] = []
        texts: list[tuple[str, str]] = []
        while True:
            try:
                kind, item = self._queue.get_nowait()
            except queue.Empty:
                break
            if kind == "metrics":
                values, step, stamp = item
                metrics.extend(Metric(key, float(v), stamp, step) for key, v in values.items())
            else:
                texts.append(item)
        for start in range(0, len(metrics), MAX_BATCH):
            self._client.log_batch(self.run_id, metrics=metrics[start:start + MAX_BATCH])
        self.sent += len(metrics)
        for text, artifact_file in texts:
            self._client.log_text(self.run_id, text, artifact_file)

    def close(self) -> None:
        """Send everything still queued and stop the thread; raises the sender's first error, if any."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"MLflow metric logging failed: {err}") from err

    def overhead(self, train_seconds: float) -> dict[str, float]:
        """Tracking cost as a fraction of training wall time (hot path + sender CPU, an upper bound)."""
        cost = self.hot_path_s + self.sender_cpu_s
        return {"tracking_seconds": cost, "tracking_fraction": cost / train_seconds if train_seconds > 0 else 0.0}



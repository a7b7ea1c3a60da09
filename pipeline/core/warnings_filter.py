"""Library warnings that tell a scratchgpt user nothing, silenced while a stage runs.

Each entry is (category, message regex): narrow on purpose, so a new warning still shows.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

NOISE: tuple[tuple[type[Warning], str], ...] = (
    # torch.distributed, through DeepSpeed's ZeRO-3 gathers: an API rename, once per gather.
    (FutureWarning, r".*all_gather_into_tensor.*"),
    (FutureWarning, r".*reduce_scatter_tensor.*"),
    (FutureWarning, r".*_all_gather_base.*|.*_reduce_scatter_base.*"),
    (UserWarning, r".*TypedStorage is deprecated.*"),
    (FutureWarning, r".*torch\.cuda\.amp.*"),
    (UserWarning, r".*Attempting to run cuBLAS, but there was no current CUDA context.*"),
)


@contextlib.contextmanager
def quiet_library_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        for category, pattern in NOISE:
            warnings.filterwarnings("ignore", message=pattern, category=category)
        yield


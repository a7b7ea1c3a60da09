"""The one base class of the errors scratchgpt raises on purpose.

Anything a user can act on (a bad config value, a damaged shard or checkpoint, a
missing upstream stage, a non-finite loss, a full disk, a held workdir lock)
raises a subclass. The stage runner prints it as one line,
`scratchgpt <stage>: <what>`, with its hint, and exits 2; any other exception is
a bug and keeps its traceback (exit 1). It lives in the lowest package so that
dataprep, training and pipeline can all raise it.
"""

from __future__ import annotations


class ScratchgptError(Exception):
    """An error the user can fix; the message names the file, line or config key."""

    hint: str = ""  # one short line of advice printed under the message, when there is one

    def __init__(self, message: str = "", hint: str = "") -> None:
        super().__init__(message)
        if hint:
            self.hint = hint


class DiskFullError(ScratchgptError):
    """A write failed for lack of space (ENOSPC); the message names the path."""

    hint = "free some space (or move the workdir) and run the same command again: the stage resumes"

"""Names that become a path component (a fine-tuning task's folder, an MLflow experiment): letters, digits,
`.`, `_` and `-`, starting with a letter or digit. So `../../x`, `/etc` or `a b` can never point a write
outside the workdir, or into a file a shell would read differently."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_LEN = 128


def check_name(value: str) -> str:
    if not NAME.fullmatch(value) or len(value) > MAX_LEN:
        raise ValueError(f"{value!r} is not a plain name: it becomes a folder or file name, so it must match "
                         f"[A-Za-z0-9][A-Za-z0-9._-]* (at most {MAX_LEN} characters)")
    return value


Name = Annotated[str, AfterValidator(check_name)]

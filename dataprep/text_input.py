"""Text that users hand to a command (`generate --prompt`, `predict`'s lines) is UTF-8, or a one-line error
naming the line. Python keeps the undecodable bytes of argv (and, under a C locale, of stdin) as lone
surrogates that the tokenizer refuses with a TypeError; these checks say what is wrong instead."""

from __future__ import annotations

from typing import BinaryIO

from dataprep.errors import ScratchgptError


class TextInputError(ScratchgptError, ValueError):
    """Input text that is not UTF-8, or no text at all; the message names the input and the line."""


def check_utf8(text: str, what: str) -> str:
    """`text` (from argv or the environment) if it came from valid UTF-8; else a TextInputError naming the line."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        before = text[:exc.start]
        line = before.count("\n") + 1
        column = exc.start - (before.rfind("\n") + 1) + 1
        char = ord(text[exc.start])
        byte = f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"code point U+{char:04X}"
        raise TextInputError(f"{what}: line {line} is not valid UTF-8 ({byte} at character {column})") from None
    return text


def read_text_lines(source: BinaryIO, name: str) -> list[str]:
    """The non-blank lines of `source`, decoded as UTF-8; an error naming `name:line` for one that is not,
    and one saying so when there is no line at all."""
    texts: list[str] = []
    for number, raw in enumerate(source, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TextInputError(f"{name}:{number}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at byte "
                                 f"{exc.start + 1} of the line)") from None
        line = line.rstrip("\r\n")
        if line.strip():
            texts.append(line)
    if not texts:
        raise TextInputError(f"{name}: no text to label: the input is empty or holds only blank lines "
                             "(give one example per line)")
    return texts

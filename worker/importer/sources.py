"""Export files: plain or gzip (told by their first bytes, not their name), read as bytes.

`open_export` returns a binary stream of the file's (decompressed) content and
a function giving how far into the file on disk the reading is, for progress.
`export_name` is the name that goes into ids derived from a file's place: the
base name without `.gz`, so the same export found under another directory, or
compressed, gives the same ids.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable, Iterator
from typing import BinaryIO

GZIP_MAGIC = b"\x1f\x8b"
READ_BUFFER = 1 << 20


def export_name(path: str) -> str:
    name = os.path.basename(path)
    return name[:-3] if name.endswith(".gz") else name


def open_export(path: str) -> tuple[BinaryIO, Callable[[], int]]:
    """(the content as a buffered binary stream, bytes of the file on disk read so far)."""
    raw = open(path, "rb")  # noqa: SIM115 - closed with the stream returned
    try:
        compressed = raw.peek(2)[:2] == GZIP_MAGIC
    except OSError:
        raw.close()
        raise
    stream: BinaryIO = gzip.GzipFile(fileobj=raw) if compressed else raw  # type: ignore[assignment]

    def position() -> int:
        try:
            return raw.tell()
        except (OSError, ValueError):
            return 0

    if compressed:
        # Closing the gzip reader does not close a file object it was given.
        original_close = stream.close

        def close() -> None:
            try:
                original_close()
            finally:
                raw.close()

        stream.close = close  # type: ignore[method-assign]
    return stream, position


def iter_lines(stream: BinaryIO) -> Iterator[bytes]:
    """The stream's lines (without their line ends), from `read1` pieces.

    A gzip stream cut short (a truncated download) yields every complete line
    before the cut, then raises EOFError; the incomplete last line is not
    yielded (it is no record).
    """
    rest = b""
    while True:
        piece = stream.read1(READ_BUFFER)  # type: ignore[attr-defined]
        if not piece:
            break
        lines = (rest + piece).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest

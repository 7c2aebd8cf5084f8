"""JSON split one level deep, without recursion: the raw text of each element or member.

msgspec (and Python's `json`) decode recursively and give up on the whole
document when one part of it is nested ~1,000 levels deep (RecursionError),
holds NaN next to an integer of more than 4,300 digits (each decoder refuses
one of the two), or holds any other value the decoder cannot take. For a
batch of events that would dead-letter every event for one bad one. These
functions cut an array (or an object) into the JSON text of its elements
(members), so that each is decoded, and refused, on its own.

Only the outer level is parsed here; each slice is left for a strict decoder.
The scan still checks what it passes over: strings are whole, brackets
balance and match (`[` with `]`, `{` with `}`), and nothing follows the
outer value. It runs in time linear in the input, with a constant number of
Python steps per run of brackets (a value nested 10⁶ deep is one run of
openers and one of closers), and allocates at most the input's size again.
"""

from __future__ import annotations

import re

from worker.errors import JsonSliceError as JsonSliceError

# One token of what the scan cares about: a whole string (escapes kept), a run of
# openers, a run of closers, a comma, or a colon. Everything else (numbers,
# literals, whitespace) lies between tokens and belongs to the current slice.
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[{]+|[\]}]+|[,:]|"', re.DOTALL)
_CLOSER_OF = bytes.maketrans(b"]}", b"[{")
_KEY = re.compile(rb'\s*("[^"\\]*(?:\\.[^"\\]*)*")\s*:', re.DOTALL)
_WHITESPACE = b" \t\r\n"


def split_array(data: bytes | bytearray | memoryview | str) -> list[bytes]:
    """The JSON text of each element of the JSON array `data`, in order.

    Raises JsonSliceError when `data` is not an array, or its brackets or
    strings are broken, or an element is missing (`[1,,2]`, `[1,]`).
    """
    return _split(_as_bytes(data), ord("["))


def split_object(data: bytes | bytearray | memoryview | str) -> list[tuple[bytes, bytes]]:
    """(the key's JSON string, the value's JSON text) of each member of the JSON object `data`.

    Raises JsonSliceError as `split_array` does, and for a member that is not
    `"key": value`.
    """
    members: list[tuple[bytes, bytes]] = []
    for member in _split(_as_bytes(data), ord("{")):
        key = _KEY.match(member)
        if key is None:
            raise JsonSliceError("an object member is not a string key, a colon and a value")
        value = member[key.end() :].strip(_WHITESPACE)
        if not value:
            raise JsonSliceError("an object member has no value")
        members.append((key.group(1), value))
    return members


def _as_bytes(data: bytes | bytearray | memoryview | str) -> bytes:
    if isinstance(data, str):
        try:
            return data.encode("utf-8")
        except UnicodeEncodeError:
            raise JsonSliceError("not valid UTF-8 (the text holds a lone surrogate)") from None
    return bytes(data)


def _split(data: bytes, opener: int) -> list[bytes]:
    start = len(data) - len(data.lstrip(_WHITESPACE))
    end = len(data.rstrip(_WHITESPACE))
    if start >= end or data[start] != opener:
        kind = "an array" if opener == ord("[") else "an object"
        raise JsonSliceError(f"not {kind}")
    # The brackets open and not yet closed below the outer one, as a stack of openers.
    stack = bytearray()
    slices: list[bytes] = []
    piece = start + 1  # where the current element starts
    pos = start + 1
    closed = -1  # where the outer value's closer is, once found
    for match in _TOKEN.finditer(data, pos, end):
        token = match.group()
        first = token[0]
        if closed >= 0:
            raise JsonSliceError(f"text after the end of the value (byte {match.start()})")
        if first == ord('"'):
            if len(token) == 1:  # a quote the string pattern could not close
                raise JsonSliceError(f"a string is not terminated (byte {match.start()})")
        elif first in b"[{":
            stack += token
        elif first in b"]}":
            wanted = token.translate(_CLOSER_OF)[::-1]
            inner = min(len(token), len(stack))
            if inner and stack[len(stack) - inner :] != wanted[len(wanted) - inner :]:
                raise JsonSliceError(f"brackets do not match (byte {match.start()})")
            del stack[len(stack) - inner :]
            if inner < len(token):  # this run closes the outer value too
                if inner + 1 < len(token) or token[inner] != (opener + 2):  # `[`+2 = `]`
                    raise JsonSliceError(f"brackets do not match (byte {match.start()})")
                closed = match.start() + inner
                _element(data, piece, closed, slices, last=True)
        elif not stack and first == ord(","):
            _element(data, piece, match.start(), slices, last=False)
            piece = match.end()
    if closed < 0:
        raise JsonSliceError("the value is not closed (truncated?)")
    if data[closed + 1 : end].strip(_WHITESPACE):
        raise JsonSliceError(f"text after the end of the value (byte {closed + 1})")
    return slices


def _element(data: bytes, begin: int, stop: int, slices: list[bytes], *, last: bool) -> None:
    text = data[begin:stop].strip(_WHITESPACE)
    if text:
        slices.append(text)
    elif slices or not last:  # `[]` and `{}` are empty; `[,` `[1,]` miss an element
        raise JsonSliceError(f"an element is missing (byte {stop})")

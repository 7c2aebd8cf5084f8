"""A distinctive password, and the checks that it shows nowhere."""

from __future__ import annotations

from urllib.parse import quote

# Distinctive, and with characters a URL must percent-encode.
PASSWORD = "Zx9-s3cr3t/p@ss:w0rd"


QUOTED = quote(PASSWORD, safe="")


def assert_no_secret(text: str, *secrets: str) -> None:
    for secret in secrets or (PASSWORD,):
        for form in {secret, quote(secret, safe=""), quote(secret)}:
            assert form not in text, f"a password shows in: {text[:2000]}"


def exception_texts(exc: BaseException) -> str:
    """str and repr of an exception and of everything it was raised from."""
    texts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        texts += [str(current), repr(current), *map(str, current.args)]
        current = current.__cause__ or current.__context__
    return "\n".join(texts)

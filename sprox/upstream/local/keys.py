"""Object keys <-> file names below a bucket directory (see the package docstring).

A key maps to a path segment by segment (split on "/"), and each segment to a plain
file name by `encode_segment`. `decode_segment` is its inverse, and answers None for
names no key encodes to, which are then neither listed nor served.
"""

from __future__ import annotations

import re

from ...s3 import errors

MAX_NAME_BYTES = 255  # the file-name limit of common file systems


def object_conflict(key: str) -> errors.S3Error:
    """An object and a "folder" of the same name: ``a`` and ``a/b`` cannot coexist."""
    return errors.S3Error(
        "ObjectConflict",
        f"The local-directory origin stores each object as a file, so an object cannot "
        f"share its name with a folder of other objects (as 'a' and 'a/b' would): "
        f"{key!r} conflicts with an existing object or folder.",
        409,
        extra={"Key": key},
    )


def key_too_long() -> errors.S3Error:
    return errors.S3Error("KeyTooLongError", "Your key is too long", 400)


_SPECIAL_SEGMENTS = {"": "%", ".": "%2E", "..": "%2E%2E"}
_SPECIAL_NAMES = {name: segment for segment, name in _SPECIAL_SEGMENTS.items()}
_NEEDS_ENCODING = re.compile(r"[%\x00-\x1f\x7f-\x9f]")
_TWO_HEX = re.compile(r"[0-9A-Fa-f]{2}")
_ESCAPE_RUN = re.compile(r"(?:%[0-9A-Fa-f]{2})+")


def _percent(char: str) -> str:
    return "".join(f"%{byte:02X}" for byte in char.encode())


def encode_segment(segment: str) -> str:
    """The file name for one "/"-separated segment of a key.

    Injective, and never "", ".", ".." or anything containing "/" or NUL. A "%" is
    escaped ("%25") only where it could be read back as an escape (before two hex
    digits, or as the whole name), so that names a user drops in, such as
    ``100%.csv``, are served under the key they look like."""
    special = _SPECIAL_SEGMENTS.get(segment)
    if special is not None:
        return special
    if segment == "%":
        return "%25"
    if not _NEEDS_ENCODING.search(segment):
        return segment
    out = []
    for index, char in enumerate(segment):
        if char == "%":
            out.append("%25" if _TWO_HEX.match(segment, index + 1) else "%")
        elif char < "\x20" or "\x7f" <= char <= "\x9f":
            out.append(_percent(char))
        else:
            out.append(char)
    return "".join(out)


def _unescape(match: re.Match[str]) -> str:
    return bytes.fromhex(match.group().replace("%", "")).decode("utf-8")


def decode_segment(name: str) -> str | None:
    """The key segment a file name stands for, or None if no key encodes to it."""
    special = _SPECIAL_NAMES.get(name)
    if special is not None:
        return special
    try:
        segment = _ESCAPE_RUN.sub(_unescape, name) if "%" in name else name
        # os.listdir gives undecodable bytes as lone surrogates: not a key.
        segment.encode("utf-8")
    except UnicodeError:
        return None
    return segment if encode_segment(segment) == name else None


def key_to_names(key: str) -> list[str]:
    """The path components, below the bucket directory, of the file holding `key`;
    KeyTooLongError if one would exceed the file-name limit."""
    names = [encode_segment(segment) for segment in key.split("/")]
    if any(len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES for name in names):
        raise key_too_long()
    return names

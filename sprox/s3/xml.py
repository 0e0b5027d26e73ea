"""S3's XML: building response documents and parsing request bodies safely.

Responses are built from plain data, a list of ``(name, value)`` pairs, where a value
is text (str), a number, a bool (``true``/``false``), a nested list of pairs, or None
(the element is left out). `render` wraps them in S3's root element, namespace and
XML declaration:

    render("InitiateMultipartUploadResult",
           [("Bucket", "b"), ("Key", "k"), ("UploadId", upload_id)])

Request bodies (CompleteMultipartUpload, DeleteObjects, CreateBucket) come from the
client, so `parse` refuses anything that could make the parser do more than read the
document: DTDs and entity declarations are rejected before parsing.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from typing import Union

from . import errors

S3_NAMESPACE = "http://s3.amazonaws.com/doc/2006-03-01/"
XML_DECLARATION = '<?xml version="1.0" encoding="UTF-8"?>\n'
CONTENT_TYPE = "application/xml"

Value = Union[str, int, bool, None, list["Node"]]
Node = tuple[str, Value]

_ESCAPES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "\r": "&#13;"}
# Characters that must not appear literally in element text: markup, a carriage
# return (a parser would normalise it to a newline and change the key), and the
# control characters XML 1.0 cannot carry at all, which S3 writes as character
# references (clients that need them ask for encoding-type=url).
_NEEDS_ESCAPE = re.compile(r'[&<>"\r\x00-\x08\x0b\x0c\x0e-\x1f\x7f]')


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    return _ESCAPES.get(char) or f"&#x{ord(char):X};"


def escape(text: str) -> str:
    """`text` safe for element content."""
    return _NEEDS_ESCAPE.sub(_escape_char, text)


def _render_value(value: Value, out: list[str]) -> None:
    if isinstance(value, bool):  # before int: bool is an int
        out.append("true" if value else "false")
    elif isinstance(value, int):
        out.append(str(value))
    elif isinstance(value, str):
        out.append(escape(value))
    else:
        for name, child in value:
            _render_node(name, child, out)


def _render_node(name: str, value: Value, out: list[str]) -> None:
    if value is None:
        return
    out.append(f"<{name}>")
    _render_value(value, out)
    out.append(f"</{name}>")


def render(root: str, children: Iterable[Node] | str = ()) -> bytes:
    """A complete S3 XML document: declaration, `root` in S3's namespace, children.

    `children` may also be plain text (e.g. a LocationConstraint value)."""
    out = [XML_DECLARATION, f'<{root} xmlns="{S3_NAMESPACE}">']
    if isinstance(children, str):
        out.append(escape(children))
    else:
        for name, value in children:
            _render_node(name, value, out)
    out.append(f"</{root}>")
    return "".join(out).encode()


# --- parsing -------------------------------------------------------------------------

# A DOCTYPE is the only way to declare entities (billion laughs, external entities);
# S3 request documents never need one. XML is case-sensitive, so these exact
# spellings are the only ones a parser would honour.
_FORBIDDEN = ("<!DOCTYPE", "<!ENTITY")


def parse(body: bytes) -> ET.Element:
    """Parse a client's XML request body; `S3Error` MalformedXML if it is not a plain,
    well-formed UTF-8 document."""
    try:
        # Decoding here (rather than letting the parser honour the document's own
        # encoding declaration) keeps the DOCTYPE check below meaningful.
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise errors.malformed_xml() from None
    if any(marker in text for marker in _FORBIDDEN):
        raise errors.malformed_xml()
    try:
        return ET.fromstring(text)
    except ET.ParseError:
        raise errors.malformed_xml() from None


def local_name(tag: str) -> str:
    """An element's name without its namespace: clients send S3's or none."""
    return tag.rpartition("}")[2]


def children(element: ET.Element, name: str) -> list[ET.Element]:
    """Direct children called `name`, in any namespace."""
    return [child for child in element if local_name(child.tag) == name]


def child_text(element: ET.Element, name: str) -> str | None:
    """Text of the first direct child called `name` ("" if empty), None if absent."""
    for child in element:
        if local_name(child.tag) == name:
            return child.text or ""
    return None

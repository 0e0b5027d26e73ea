# Type stubs for the compiled module; the pure-Python twin _ranges_py is annotated inline.
from sprox._native._ranges_py import RangeNotSatisfiable as RangeNotSatisfiable

__all__ = [
    "RangeNotSatisfiable",
    "block_bounds",
    "block_count",
    "block_span",
    "content_range",
    "parse_range",
]

def parse_range(header: str | None, size: int) -> tuple[int, int] | None: ...
def content_range(first: int, last: int, size: int) -> str: ...
def block_span(first: int, last: int, block_size: int) -> tuple[int, int]: ...
def block_bounds(index: int, block_size: int, size: int) -> tuple[int, int]: ...
def block_count(size: int, block_size: int) -> int: ...

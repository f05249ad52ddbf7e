"""Captions: names joined as "a . b . c ." with each name's character span."""
from __future__ import annotations

from typing import List, Sequence, Tuple

SEPARATOR = " . "
TERMINATOR = " ."


def normalize_name(name: str) -> str:
    return name.strip().lower()


def build_caption(names: Sequence[str]) -> Tuple[str, List[Tuple[int, int]]]:
    """Join names (lower-cased, stripped) into a caption and return each name's (start, end) character span.

    Spans are recorded while joining, so a name that also occurs inside an earlier name ("car" after "race car")
    still points at its own position rather than at the first substring match.
    """
    parts: List[str] = []
    spans: List[Tuple[int, int]] = []
    start = 0
    for name in names:
        part = normalize_name(name)
        if not part:
            raise ValueError(f"empty name in caption names {list(names)!r}")
        parts.append(part)
        spans.append((start, start + len(part)))
        start += len(part) + len(SEPARATOR)
    return SEPARATOR.join(parts) + TERMINATOR, spans

"""The filler text of passkey prompts (also RULER's "noise" haystack) and where a needle may go in it."""

from __future__ import annotations

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def nearest(boundaries: list[int], target: float) -> int:
    """The insertion point nearest ``target`` (ties to the earlier one)."""
    return min(boundaries, key=lambda b: (abs(b - target), b))

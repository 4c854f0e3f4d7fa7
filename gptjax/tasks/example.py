"""One labelled (or, for test splits, unlabelled) task example, whatever file it came from."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Example:
    # GLUE submissions are matched to test examples by this index, so it survives every reader.
    idx: int
    texts: tuple[str, ...]  # in the order of Task.text_fields
    label: int | float | None  # label id, a regression score, or None where labels are withheld

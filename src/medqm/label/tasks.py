"""Diagnostic question/answer items (VQA) for reference images.

The one in-memory form is `VQAItem`; task files are JSONL or CSV with the same fields. Image paths in a
file are relative to the file's folder (or absolute).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class VQAItem:
    """One question about one image with its correct answer.

    ``choices`` is the closed answer set when there is one (used to measure accuracy: the answer the model
    finds most likely among them); ``answer_type`` is e.g. 'modality', 'body_part', 'plane',
    'lesion_present', 'lesion_quadrant', or VQA-RAD's 'CLOSED'/'OPEN'.
    """

    image: str
    question: str
    answer: str
    case_id: str
    answer_type: str | None = None
    image_id: str | None = None
    modality: str | None = None
    choices: list[str] | None = field(default=None)

    def to_dict(self) -> dict:
        return asdict(self)


def image_quadrant(row: float, col: float, shape) -> str:
    H, W = shape[:2]
    v = "upper" if row < (H - 1) / 2 else "lower"
    h = "left" if col < (W - 1) / 2 else "right"
    return f"{v} {h}"

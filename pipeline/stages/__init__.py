"""Stage backends; importing this package registers every backend (see base.REGISTRY)."""

from pipeline.stages import (  # noqa: F401
    audio,
    decode,
    faces,
    metadata,
    ocr,
    separate,
    text,
    visual,
)

"""What every fusion head receives: an InputSpec (which modalities, their dims) and batches.

A batch is a dict: for each input modality m, batch[m] = {"pooled": [B, Dp] float,
"present": [B] bool, and for sequence modalities "seq": [B, T, D] float, "len": [B] long}.
batch["cond"] (when the feature set has a conditioning vector, e.g. the title embedding) has
the same keys as a vector modality. Absent rows have present=False: heads must mask them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModalitySpec:
    name: str
    pooled_dim: int
    seq_dim: int = 0  # 0: a vector modality (no sequence)
    max_len: int = 0

    @property
    def is_sequence(self) -> bool:
        return self.seq_dim > 0 and self.max_len > 0


@dataclass(frozen=True)
class InputSpec:
    modalities: tuple[ModalitySpec, ...]  # the inputs the head fuses (any non-empty subset)
    cond: ModalitySpec | None = None  # conditioning vector (title / dialogue context), if any
    extra: dict = field(default_factory=dict)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.modalities)

    def __getitem__(self, name: str) -> ModalitySpec:
        for m in self.modalities:
            if m.name == name:
                return m
        raise KeyError(name)

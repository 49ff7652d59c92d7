"""Torch-only replacements for the two torchvision functions facenet-pytorch's MTCNN needs.

Why this exists: facenet-pytorch's `detect_face` module does
`from torchvision.ops.boxes import batched_nms` and
`from torchvision.transforms import functional as F` (for `F.to_tensor`) at import time.
On this project's machines torchvision is either absent or a CUDA-linked build that fails to
load (and a broken torchvision breaks `transformers` too), so we never import it ourselves.

`import_facenet()` imports facenet-pytorch with a minimal stand-in `torchvision` package
placed in `sys.modules` *only for the duration of that import*, then removes it again: the
facenet modules keep references to our functions, and nothing else in the process ever sees
a fake torchvision (`importlib.util.find_spec("torchvision")`, which transformers uses to
probe for it, is unaffected afterwards). If the real torchvision is already imported by the
host process, it is used as is and no stand-in is created.
"""

from __future__ import annotations

import sys
import threading
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

_SHIM_NAMES = (
    "torchvision",
    "torchvision.ops",
    "torchvision.ops.boxes",
    "torchvision.transforms",
    "torchvision.transforms.functional",
)
_IMPORT_LOCK = threading.Lock()

# Above this many boxes of one image the pairwise IoU matrix (n*n bools) gets large; the
# greedy loop then computes IoU of one kept box against the remaining ones instead.
_MATRIX_LIMIT = 4096


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of boxes [N, 4] and [M, 4] in (x1, y1, x2, y2), continuous coordinates
    (area = w * h, as torchvision computes it, not MTCNN's +1 pixel convention)."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS: indices of kept boxes, by decreasing score; a box is dropped when its IoU
    with an already kept box is strictly greater than `iou_threshold` (torchvision's rule)."""
    n = boxes.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    order = torch.argsort(scores, descending=True, stable=True)
    sorted_boxes = boxes[order].float()
    if n <= _MATRIX_LIMIT:
        keep = _greedy_matrix(sorted_boxes, iou_threshold)
    else:
        keep = _greedy_loop(sorted_boxes, iou_threshold)
    return order[torch.as_tensor(keep, dtype=torch.long, device=boxes.device)]


def _greedy_matrix(sorted_boxes: torch.Tensor, thr: float) -> list[int]:
    """Greedy sweep over a precomputed overlap matrix (fast: numpy row ORs, no torch calls
    per box)."""
    over = (box_iou(sorted_boxes, sorted_boxes) > thr).cpu().numpy()
    suppressed = np.zeros(over.shape[0], dtype=bool)
    keep: list[int] = []
    for i in range(over.shape[0]):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= over[i]
    return keep


def _greedy_loop(sorted_boxes: torch.Tensor, thr: float) -> list[int]:
    """Memory-light greedy NMS: one kept box against the remaining ones per step."""
    remaining = torch.arange(sorted_boxes.shape[0], device=sorted_boxes.device)
    keep: list[int] = []
    while remaining.numel() > 0:
        i = remaining[0]
        keep.append(int(i))
        rest = remaining[1:]
        if rest.numel() == 0:
            break
        iou = box_iou(sorted_boxes[i : i + 1], sorted_boxes[rest])[0]
        remaining = rest[iou <= thr]
    return keep


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """NMS independently per category `idxs` (for MTCNN: per image of a batch). Returns kept
    indices sorted by decreasing score, like `torchvision.ops.batched_nms`."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    kept: list[torch.Tensor] = []
    for c in torch.unique(idxs):
        members = torch.nonzero(idxs == c).flatten()
        kept.append(members[nms(boxes[members], scores[members], iou_threshold)])
    keep = torch.cat(kept)
    return keep[torch.argsort(scores[keep], descending=True, stable=True)]


def to_tensor(pic: Any) -> torch.Tensor:
    """torchvision's `to_tensor` for numpy / PIL input: HWC → CHW; uint8 scaled to [0, 1],
    other dtypes left as they are."""
    arr = np.asarray(pic)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    t = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
    if t.dtype == torch.uint8:
        return t.to(torch.get_default_dtype()).div(255)
    return t


def _shim_modules() -> dict[str, types.ModuleType]:
    mods = {name: types.ModuleType(name) for name in _SHIM_NAMES}
    mods["torchvision.ops.boxes"].batched_nms = batched_nms  # type: ignore[attr-defined]
    mods["torchvision.ops.boxes"].nms = nms  # type: ignore[attr-defined]
    mods["torchvision.ops"].boxes = mods["torchvision.ops.boxes"]  # type: ignore[attr-defined]
    mods["torchvision.transforms.functional"].to_tensor = to_tensor  # type: ignore[attr-defined]
    mods["torchvision.transforms"].functional = mods["torchvision.transforms.functional"]  # type: ignore[attr-defined]
    mods["torchvision"].ops = mods["torchvision.ops"]  # type: ignore[attr-defined]
    mods["torchvision"].transforms = mods["torchvision.transforms"]  # type: ignore[attr-defined]
    for m in mods.values():
        m.__mmemo_shim__ = True  # type: ignore[attr-defined]
        m.__path__ = []  # type: ignore[attr-defined]  # a package, so submodule imports resolve
    return mods


@contextmanager
def _torchvision_stand_in() -> Iterator[None]:
    """Expose the stand-in torchvision while the body runs, unless the real one is loaded."""
    if "torchvision" in sys.modules:
        yield
        return
    mods = _shim_modules()
    sys.modules.update(mods)
    try:
        yield
    finally:
        for name in _SHIM_NAMES:
            if sys.modules.get(name) is mods[name]:
                del sys.modules[name]


def import_facenet() -> types.ModuleType:
    """Import and return `facenet_pytorch` without importing torchvision (see module doc)."""
    with _IMPORT_LOCK:
        if "facenet_pytorch" in sys.modules:
            return sys.modules["facenet_pytorch"]
        with _torchvision_stand_in():
            import facenet_pytorch

        return facenet_pytorch

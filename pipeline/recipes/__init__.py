"""The recipe registry: recipe name -> module (its `prepare`, `LAYOUT` and `CLASSES`).

Only the registry lives here; the shared helpers are in `pipeline.recipes.common` (the
recipes import them from there, so importing a recipe module never re-enters this package's
initialisation). The helper names below are re-exported for existing callers.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

from pipeline.manifest import MANIFEST_DIR
from pipeline.recipes import avamerg, cremad, folder, iemocap, meld, mosi, ravdess, ugc
from pipeline.recipes.common import PrepareResult, grouped_split, hash_fraction, write_result

MODULES: dict[str, ModuleType] = {
    "avamerg": avamerg,
    "cremad": cremad,
    "folder": folder,
    "iemocap": iemocap,
    "meld": meld,
    "mosei": mosi,
    "mosi": mosi,
    "ravdess": ravdess,
    "ugc": ugc,
}

RECIPES: dict[str, Callable[..., PrepareResult]] = {
    name: getattr(mod, f"prepare_{name}", mod.prepare) for name, mod in MODULES.items()
}


def describe(name: str) -> dict[str, object]:
    """What `mmemo prepare --list` shows for one recipe, read from the recipe module itself."""
    mod = MODULES[name]
    layouts = getattr(mod, "LAYOUTS", None)
    classes = getattr(mod, "CLASSES_OF", None)
    return {
        "name": name,
        "layout": layouts[name] if layouts else mod.LAYOUT,
        "classes": list(classes[name] if classes else getattr(mod, "CLASSES", [])),
        "summary": (mod.__doc__ or "").strip().splitlines()[0],
    }


__all__ = [
    "MANIFEST_DIR",
    "MODULES",
    "PrepareResult",
    "RECIPES",
    "describe",
    "grouped_split",
    "hash_fraction",
    "write_result",
]

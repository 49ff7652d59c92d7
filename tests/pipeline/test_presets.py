"""The typed preset, the unit task and planning from clips in memory.

Defaults of `[store]` / `[run]` live in presets.py once and apply where a preset omits a key;
the tables as written (not the filled-in defaults) are what set keys hash. A `UnitTask` must
survive pickling (process pools, Dask). `plan_extract` from clips in memory gives the same
plan as from the manifest on disk (what `predict` relies on).
"""

from __future__ import annotations

import pickle
import tomllib

import pytest

from pipeline.presets import (
    PRESET_DIR,
    STAGE_ORDER,
    Preset,
    RunSettings,
    StoreSettings,
    load_preset,
)
from pipeline.stages.base import get_backend

SMALL = {"unit_size": 2, "max_len": {"audio": 8, "text": 4, "visual": 4}}


def _table(name: str) -> dict:
    return tomllib.loads((PRESET_DIR / f"{name}.toml").read_text())


@pytest.mark.parametrize("name", ["offline", "full"])
def test_typed_preset_mirrors_its_toml(name):
    raw = _table(name)
    p = load_preset(name)
    assert isinstance(p, Preset) and p.name == name
    assert p.store == StoreSettings(**raw["store"]) and p.run == RunSettings(**raw["run"])
    assert p.store.compression == raw["store"]["compression"] and p.run.clip_timeout == raw["run"]["clip_timeout"]
    assert list(p.stages) == list(STAGE_ORDER)
    for stage in STAGE_ORDER:
        table = dict(raw[stage])
        pick = p.stages[stage]
        assert pick.backend == table.pop("backend")
        assert isinstance(pick.config, get_backend(stage, pick.backend).Config)
        # the config model holds what the table says (and defaults for the rest)
        dumped = pick.config.model_dump(mode="json")
        assert all(dumped[k] == v for k, v in table.items()), (stage, table, dumped)
    assert p.data["store"] == raw["store"]  # as written, nothing filled in


def test_omitted_store_and_run_keys_take_the_one_default_but_data_stays_as_written():
    data = _table("offline")
    data["store"] = dict(SMALL)
    del data["run"]
    p = load_preset(data)
    assert p.data["store"] == SMALL and "run" not in p.data  # hashed as written
    assert p.store.compression == StoreSettings().compression == "blosc-lz4"
    assert p.store.inner_chunk == StoreSettings().inner_chunk == 128
    assert p.store.max_len_of("audio") == 8 and p.store.max_len_of("other") == StoreSettings.DEFAULT_MAX_LEN
    assert p.run == RunSettings()
    assert (p.run.batch_size, p.run.clip_timeout, p.run.decode_workers, p.run.lease) == (16, 300.0, 2, 120.0)


def test_overrides_and_their_errors():
    p = load_preset("offline", ["decode.fps=4", "run.clip_timeout=1.5", "store.level=5"])
    assert p.stages["decode"].config.fps == 4.0 and p.run.clip_timeout == 1.5 and p.store.level == 5
    assert p.data["decode"]["fps"] == 4
    with pytest.raises(ValueError, match="must look like stage.key=value"):
        load_preset("offline", ["fps=4"])
    with pytest.raises(ValueError, match="'name' is not a table"):
        load_preset("offline", ["name.x=1"])
    with pytest.raises(ValueError):  # typos in a stage config or in [run] do not pass
        load_preset("offline", ["decode.fsp=4"])
    with pytest.raises(ValueError):
        load_preset("offline", ["run.clip_timout=4"])
    with pytest.raises(KeyError, match="unknown backend 'nope' for stage 'audio'"):
        load_preset("offline", ["audio.backend=nope"])
    with pytest.raises(FileNotFoundError, match="unknown preset 'nope'"):
        load_preset("nope")
    data = _table("offline")
    del data["ocr"]
    with pytest.raises(ValueError, match=r"missing stage tables \['ocr'\]"):
        load_preset(data)


def test_skip_and_a_preset_reloaded_from_its_data():
    p = load_preset("offline", ["ocr.backend=skip"])
    assert p.stages["ocr"].skipped and p.stages["ocr"].config is None
    again = load_preset(p.data)  # what predict / cache verify --repair do with a set's attrs
    assert again == p and load_preset(p) == p


def test_needs_media_flags():
    p = load_preset("offline")
    flags = {s: get_backend(s, p.stages[s].backend).needs_media for s in STAGE_ORDER}
    assert flags == {s: s not in ("text", "metadata") for s in STAGE_ORDER}
    assert all(get_backend(s, p.stages[s].backend).name == s for s in STAGE_ORDER)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from pipeline.recipes import RECIPES
    from pipeline.sample import make_sample

    d = tmp_path_factory.mktemp("tiny")
    root = make_sample(d / "data", n=3, seed=1)
    RECIPES["folder"](root=root, out=d / "manifests", name="tiny")
    return root, d / "manifests"


def test_plan_from_clips_in_memory_equals_plan_from_the_manifest(tiny):
    from pipeline.manifest import load_dataset, read_dataset_info
    from pipeline.plan import plan_extract

    root, man = tiny
    pre = _table("offline") | {"store": SMALL}
    on_disk = plan_extract("tiny", root, pre, manifests=man)
    mem = plan_extract("tiny", root, pre, manifests=man / "nowhere",
                       clips=load_dataset("tiny", man), info=read_dataset_info("tiny", man))
    assert mem.key == on_disk.key and mem.layout == on_disk.layout and mem.clips == on_disk.clips
    assert on_disk.layout.unit_size == 2 and on_disk.layout.n_units == 2
    with pytest.raises(ValueError, match="no clips in the clips given"):
        plan_extract("tiny", root, pre, clips=[], info={})


def test_unit_task_pickles_and_carries_the_run_settings(tiny, tmp_path):
    from pipeline.plan import plan_extract
    from pipeline.runner import UnitTask, unit_tasks

    root, man = tiny
    plan = plan_extract("tiny", root, _table("offline") | {"store": SMALL}, manifests=man)
    tasks = unit_tasks(plan, tmp_path / "cache", [0, 1], None, 60.0, 1)
    assert all(isinstance(t, UnitTask) for t in tasks)
    assert [len(t.clips) for t in tasks] == [2, 1]
    assert tasks[1].clips == [c.model_dump(mode="json") for c in plan.clips[2:]]
    back = pickle.loads(pickle.dumps(tasks[0]))
    assert back == tasks[0] and back.preset.run == plan.preset.run and back.lease == 60.0

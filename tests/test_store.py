"""Feature shards: atomic writes, hash verification, loading with T padding and split filters."""

import json

import pytest
import safetensors.torch
import torch

from hf_flowcheck import FlowConfig
from hf_flowcheck.workflows.store import (
    MANIFEST_NAME,
    STORE_FORMAT,
    STORE_FORMAT_VERSION,
    CorruptShardError,
    FeatureStore,
    FeatureStoreError,
    ShardData,
    read_shard,
    shard_name,
    write_manifest,
    write_shard,
)

NAMES = FlowConfig().feature_names


def _shard(n, t, start, seed=0):
    g = torch.Generator().manual_seed(seed)
    valid = torch.zeros(n, 3, t, dtype=torch.bool)
    positions = torch.full((n, t), -1, dtype=torch.long)
    for i in range(n):
        k = 1 + i % t
        valid[i, :, :k] = True
        positions[i, :k] = torch.arange(5, 5 + k)
    values = torch.randn(n, 3, t, len(NAMES), generator=g) * valid.unsqueeze(-1)
    uids = [f"r:{(start + i) // 2}" for i in range(n)]
    return ShardData(
        values=values,
        valid=valid,
        positions=positions,
        labels=torch.arange(start, start + n) % 2,
        index=torch.arange(start, start + n),
        sample_keys=torch.arange(start, start + n) * 7,
        prompt_lengths=torch.full((n,), 5),
        uids=uids,
        metadata={"sources": ["right", "hallucinated"] * (n // 2), "shard": start, "counts": {"stored": n}},
    )


def _make_store(path, shards):
    entries = []
    for i, sh in enumerate(shards):
        digest = write_shard(path / shard_name(i), sh)
        entries.append({"index": i, "file": shard_name(i), "sha256": digest, "num_samples": len(sh), "counts": {}})
    manifest = {
        "format": STORE_FORMAT,
        "format_version": STORE_FORMAT_VERSION,
        "status": "complete",
        "protocol": "paired",
        "flow_config": FlowConfig().to_dict(),
        "feature_names": list(NAMES),
        "num_blocks": 3,
        "shards": entries,
        "counts": {},
    }
    write_manifest(path, manifest)
    return manifest


def test_shard_round_trip(tmp_path):
    sh = _shard(4, 3, 0)
    write_shard(tmp_path / "shard-00000.safetensors", sh)
    back = read_shard(tmp_path / "shard-00000.safetensors")
    for name in ("values", "valid", "positions", "labels", "index", "sample_keys", "prompt_lengths"):
        assert torch.equal(getattr(back, name), getattr(sh, name)), name
    assert back.uids == sh.uids and back.metadata == sh.metadata
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.safetensors"]


def test_load_pads_t_across_shards_and_filters_by_uid(tmp_path):
    a, b = _shard(4, 2, 0, seed=1), _shard(2, 5, 4, seed=2)
    _make_store(tmp_path, [a, b])
    store = FeatureStore.open(tmp_path)
    assert len(store) == 6 and store.config == FlowConfig()
    feats, labels, uids = store.load()
    assert feats.values.shape == (6, 3, 5, len(NAMES))
    assert torch.equal(feats.values[:4, :, :2], a.values) and not feats.valid[:4, :, 2:].any()
    assert (feats.positions[:4, 2:] == -1).all()
    assert torch.equal(feats.values[4:], b.values)
    assert labels.tolist() == [0, 1, 0, 1, 0, 1] and uids == a.uids + b.uids
    assert feats.sample_keys == [0, 7, 14, 21, 28, 35]
    sub, sub_labels, sub_uids = store.load(split_uids={"r:1", "r:2"})
    assert sub_uids == ["r:1", "r:1", "r:2", "r:2"]
    assert torch.equal(sub.values[:2, :, :2], a.values[2:]) and sub_labels.tolist() == [0, 1, 0, 1]
    empty, empty_labels, none = store.load(split_uids=[])
    assert empty.values.shape[0] == 0 and none == [] and empty_labels.numel() == 0
    assert [s["uid"] for s in store.samples()] == uids and store.samples()[1]["source"] == "hallucinated"


def test_corrupted_shard_is_named_with_the_fix(tmp_path):
    _make_store(tmp_path, [_shard(2, 2, 0), _shard(2, 2, 2)])
    path = tmp_path / shard_name(1)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=r"shard-00001\.safetensors.*corrupted.*Delete it.*rerun"):
        FeatureStore.open(tmp_path)
    FeatureStore.open(tmp_path, verify=False)  # explicit opt-out still opens
    path.unlink()
    with pytest.raises(CorruptShardError, match="missing"):
        FeatureStore.open(tmp_path)


def test_missing_or_incomplete_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="flowcheck extract"):
        FeatureStore.open(tmp_path)
    manifest = _make_store(tmp_path, [_shard(2, 2, 0)])
    write_manifest(tmp_path, {**manifest, "status": "in_progress"})
    with pytest.raises(FeatureStoreError, match=r"has not finished.*resume"):
        FeatureStore.open(tmp_path)
    assert len(FeatureStore.open(tmp_path, allow_incomplete=True)) == 2
    write_manifest(tmp_path, {**manifest, "format_version": STORE_FORMAT_VERSION + 1})
    with pytest.raises(FeatureStoreError, match="upgrade hf_flowcheck"):
        FeatureStore.open(tmp_path)
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["format"] == STORE_FORMAT


def test_kill_during_write_leaves_no_partial_shard(tmp_path, monkeypatch):
    real = safetensors.torch.save_file

    def dying_save(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # a half-written file, then the process "dies"
            f.truncate(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        write_shard(tmp_path / shard_name(0), _shard(2, 2, 0))
    assert list(tmp_path.iterdir()) == []


def test_written_files_follow_the_umask(tmp_path):
    import os

    from hf_flowcheck.workflows.store import atomic_write_bytes

    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "m.json", b"{}")
    finally:
        os.umask(old)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644


def test_manifest_entries_outside_the_store_or_listed_twice_are_refused(tmp_path):
    manifest = _make_store(tmp_path, [_shard(2, 2, 0), _shard(2, 2, 2)])
    first = manifest["shards"][0]
    outside = {**manifest, "shards": [{**first, "file": "../elsewhere.safetensors"}, manifest["shards"][1]]}
    write_manifest(tmp_path, outside)
    with pytest.raises(FeatureStoreError, match=r"must name its own file inside the store"):
        FeatureStore.open(tmp_path)
    twice = {**manifest, "shards": [first, {**first, "index": 1, "file": shard_name(1)}]}
    write_manifest(tmp_path, twice)
    with pytest.raises(FeatureStoreError, match="lists the same shard twice"):
        FeatureStore.open(tmp_path)
    write_manifest(tmp_path, manifest)
    assert len(FeatureStore.open(tmp_path)) == 4

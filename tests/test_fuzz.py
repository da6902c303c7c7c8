"""Property-based fuzzing of what users and files hand us: configs, answers files, generate options.

Invariants: bad input is a named error of the documented kinds (never a raw ``KeyError``,
``IndexError`` or ``AttributeError``), no hook is ever left on the model, an artifact is unchanged
by a failed save, and a failed call does not change the next call's score.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from conftest import make_tiny_model, tiny_validator
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_flowcheck import FlowCheckedModelForCausalLM
from hf_flowcheck.configuration import FlowConfig
from hf_flowcheck.detectors.flow_validator import ValidatorConfig
from hf_flowcheck.errors import AnswerFileError
from hf_flowcheck.workflows.answers import read_answers

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _edits(base: dict) -> st.SearchStrategy[dict]:
    keys = st.sampled_from(sorted(base)) | st.text(max_size=8)
    return st.dictionaries(keys, json_values, max_size=4).map(lambda e: {**base, **e})


@FUZZ
@given(_edits(FlowConfig().to_dict()))
def test_flow_config_from_any_dict_is_valid_or_a_value_error(data):
    try:
        cfg = FlowConfig.from_dict(data)
    except (ValueError, TypeError) as err:
        assert str(err)
        return
    assert FlowConfig.from_dict(cfg.to_dict()) == cfg


@FUZZ
@given(_edits(ValidatorConfig(num_features=10).to_dict()))
def test_validator_config_from_any_dict_is_valid_or_a_value_error(data):
    try:
        cfg = ValidatorConfig.from_dict(data)
    except (ValueError, TypeError) as err:
        assert str(err)
        return
    assert cfg.hidden <= 4096 and cfg.members <= 64  # nothing absurd is ever allocated


@pytest.fixture(scope="module")
def answers_file(tmp_path_factory):
    from test_workflows_answers import records, write

    path = tmp_path_factory.mktemp("fuzz") / "a.jsonl"
    write(make_tiny_model("llama"), path, records(3))
    return path.read_text().splitlines()


@FUZZ
@given(line=st.integers(0, 3), edit=st.dictionaries(st.text(max_size=10), json_values, max_size=3), tmp=st.just(None))
def test_an_edited_answers_line_is_read_or_named(answers_file, tmp_path, line, edit, tmp):
    lines = list(answers_file)
    lines[line] = json.dumps({**json.loads(lines[line]), **edit})
    path = tmp_path / "f.jsonl"
    path.write_text("\n".join(lines) + "\n")
    try:
        read_answers(path)
    except AnswerFileError as err:
        assert "f.jsonl" in str(err)  # the file, and the line where it applies


@pytest.fixture(scope="module")
def fc():
    model = make_tiny_model("llama")
    return FlowCheckedModelForCausalLM(model, tiny_validator(model))


OPTIONS = {
    "return_flow_scores": st.sampled_from([True, False, None, 1, "yes"]),
    "flow_check_every": st.sampled_from([None, 0, 1, 2, -1, 1.5, True, "2"]),
    "flow_abstain_threshold": st.sampled_from([None, 0.0, 0.5, 1.0, 2.0, -0.1, "recommended", "high"]),
    "flow_rollback_threshold": st.sampled_from([None, 0.0, 0.9, 1.5]),
    "flow_check_refit": st.sampled_from([None, "always", "doubling", "never"]),
    "flow_max_rollbacks": st.sampled_from([None, 1, 2, 0, -3]),
    "num_beams": st.sampled_from([None, 1, 2]),
    "use_cache": st.sampled_from([None, True, False]),
}
PROMPT = torch.tensor([[5, 6, 7, 8, 9]])


@FUZZ
@given(st.fixed_dictionaries({}, optional=OPTIONS))
def test_generate_options_work_or_are_named_and_change_nothing(fc, options):
    kw = {k: v for k, v in options.items() if v is not None}
    base = dict(max_new_tokens=4, do_sample=False, suppress_tokens=[98])
    before = fc.generate(input_ids=PROMPT, return_flow_scores=True, **base).flow_scores
    try:
        fc.generate(input_ids=PROMPT, **base, **kw)
    except (ValueError, TypeError) as err:
        assert str(err)
    except RuntimeError as err:  # a decoding mode transformers itself refuses
        assert "beam" in str(err).lower() or "cache" in str(err).lower(), err
    for m in fc.base_model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    after = fc.generate(input_ids=PROMPT, return_flow_scores=True, **base).flow_scores
    torch.testing.assert_close(after, before)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    from test_store import _make_store, _shard

    root = tmp_path_factory.mktemp("store")
    _make_store(root, [_shard(4, 2, 0, seed=1), _shard(2, 3, 4, seed=2)])
    return root


@FUZZ
@given(st.data())
def test_an_edited_store_manifest_loads_the_same_or_is_named(store_dir, tmp_path_factory, data):
    """An edited manifest (any field, any JSON value, at the top or in a shard entry) is refused with a
    FeatureStoreError/ValueError naming the problem, or loads exactly what the intact store loads."""
    import shutil

    from hf_flowcheck.errors import FeatureStoreError
    from hf_flowcheck.workflows.store import MANIFEST_NAME, FeatureStore

    work = tmp_path_factory.mktemp("edit")
    shutil.rmtree(work)
    shutil.copytree(store_dir, work)
    manifest = json.loads((work / MANIFEST_NAME).read_text())
    intact, labels, uids = FeatureStore.open(store_dir).load()
    if data.draw(st.booleans()):
        manifest = data.draw(_edits(manifest))
    else:
        i = data.draw(st.integers(0, len(manifest["shards"]) - 1))
        manifest["shards"][i] = data.draw(_edits(manifest["shards"][i]))
    (work / MANIFEST_NAME).write_text(json.dumps(manifest))
    try:
        feats, labels2, uids2 = FeatureStore.open(work).load()
    except (FeatureStoreError, ValueError, FileNotFoundError) as err:
        assert str(err)
        return
    assert uids2 == uids and torch.equal(labels2, labels) and torch.equal(feats.values, intact.values)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kills=st.lists(st.integers(0, 2), min_size=1, max_size=3), litter=st.booleans())
def test_an_extraction_killed_any_number_of_times_resumes_to_the_same_store(tmp_path_factory, kills, litter):
    """Kills after any shards, any number of times, with a killed write's temp file left behind: the
    resumed store equals one uninterrupted run, shard for shard."""
    import test_workflows_extract as twe

    import hf_flowcheck.workflows.extract as pl
    from hf_flowcheck.workflows.store import FeatureStore

    model = _extract_model()
    reference = _extract_reference(tmp_path_factory)
    out = tmp_path_factory.mktemp("resume") / "store"
    for k in sorted(kills):

        def crash(index, k=k):
            if index == k:
                raise KeyboardInterrupt(f"simulated kill after shard {k}")

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(pl, "_after_shard_hook", crash)
            with contextlib.suppress(KeyboardInterrupt):
                twe.run(model, out)
        if litter:
            (out / f".tmp-shard-{k + 1:05d}.safetensors.x").write_bytes(b"partial")
    store = twe.run(model, out)
    twe.assert_same_features(store, reference)
    assert [e["sha256"] for e in store.shards] == [e["sha256"] for e in reference.shards]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp")]
    assert FeatureStore.open(out).manifest["status"] == "complete"


_EXTRACT: dict = {}


def _extract_model():
    if "model" not in _EXTRACT:
        _EXTRACT["model"] = make_tiny_model("llama")
    return _EXTRACT["model"]


def _extract_reference(tmp_path_factory):
    import test_workflows_extract as twe

    if "ref" not in _EXTRACT:
        _EXTRACT["ref"] = twe.run(_extract_model(), tmp_path_factory.mktemp("ref") / "store")
    return _EXTRACT["ref"]

"""The committed answers file: resumable generation, strict reading, and replay equal to capture."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model, tiny_flow_config
from test_workflows_extract import CharTokenizer

from hf_flowcheck.data import Example, ReferenceF1Judge
from hf_flowcheck.extraction import FlowExtractor
from hf_flowcheck.fingerprint import model_fingerprint
from hf_flowcheck.generation import capture_generate
from hf_flowcheck.workflows import extract as pl
from hf_flowcheck.workflows.answers import AnswerDecoding, AnswerFileError, generate_answers, read_answers
from hf_flowcheck.workflows.replay import load_parts, replay_answers


def records(n=7):
    return [Example(f"g:{i}", "qa", {"knowledge": "k", "question": f"q{i}?"}, reference="Ann") for i in range(n)]


def prompt(ex):
    return f"Question: {ex.prompt_fields['question']}\nAnswer:"


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("llama")


def write(model, path, recs, **kw):
    args = dict(
        prompt_fn=prompt,
        judge=ReferenceF1Judge(),
        dataset={"name": "toy"},
        fingerprint=model_fingerprint(model),
        postprocess=lambda s: s,
        log=None,
    )
    decoding = {"batch_size": kw.pop("batch_size", 3), "max_new_tokens": kw.pop("max_new_tokens", 6)}
    args.update(kw)
    return generate_answers(model, CharTokenizer(), recs, path, decoding=AnswerDecoding(**decoding), **args)


def test_generate_resume_and_strict_reading(model, tmp_path):
    path = tmp_path / "a.jsonl"
    first = write(model, path, records(4))
    assert len(first.records) == 4 and first.header["dataset"] == {"name": "toy"}
    whole = write(model, path, records(7))  # resumes: only the 3 new records are answered
    assert [r.uid for r in whole.records[:4]] == [r.uid for r in first.records]
    assert sorted(r.uid for r in whole.records) == sorted(r.uid for r in records(7))
    fresh = write(model, tmp_path / "b.jsonl", records(7))
    by_uid = {r.uid: r for r in fresh.records}
    for r in whole.records:  # greedy answers do not depend on where a run was resumed
        assert r.gen_ids == by_uid[r.uid].gen_ids
    # a kill mid-write leaves a torn line: reading refuses it, resuming cuts it
    good = path.read_bytes()
    path.write_bytes(good + b'{"kind": "answer", "uid": "g:9", "pro')
    with pytest.raises(AnswerFileError, match="incomplete"):
        read_answers(path)
    write(model, path, records(7))
    assert path.read_bytes() == good
    # other settings are refused, naming the difference
    with pytest.raises(AnswerFileError, match="another decoding"):
        write(model, path, records(7), max_new_tokens=5)
    with pytest.raises(AnswerFileError, match="another dataset"):
        write(model, path, records(7), dataset={"name": "other"})


def test_malformed_files_are_named(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"kind": "nope"}\n')
    with pytest.raises(AnswerFileError, match="header"):
        read_answers(p)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_answers(tmp_path / "missing.jsonl")


def test_duplicate_uid_is_refused(model, tmp_path):
    path = tmp_path / "a.jsonl"
    write(model, path, records(2))
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines, lines[1]]) + "\n")
    with pytest.raises(AnswerFileError, match="appears twice"):
        read_answers(path)
    # resuming repairs it: the first record of each uid is kept, and the run goes on
    first = lines[1]
    path.write_text("\n".join([*lines, lines[1].replace('"gen_ids": [', '"gen_ids": [5, '), lines[2]]) + "\n")
    whole = write(model, path, records(3))
    assert [r.uid for r in whole.records] == ["g:0", "g:1", "g:2"]
    assert path.read_text().splitlines()[1] == first


def test_a_second_writer_is_refused_with_the_holders_pid(model, tmp_path):
    import os

    from hf_flowcheck.errors import WriterBusyError
    from hf_flowcheck.filelocks import exclusive_writer

    path = tmp_path / "a.jsonl"
    with exclusive_writer(path, "answers file"), pytest.raises(WriterBusyError, match=f"PID {os.getpid()}"):
        write(model, path, records(2))
    assert not path.exists()
    write(model, path, records(2))  # free again


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda r: {**r, "gen_ids": ["a"]}, "gen_ids"),
        (lambda r: {**r, "label": 2}, "label=2"),
        (lambda r: {**r, "answer_len": 99}, "answer_len=99"),
        (lambda r: {**r, "uid": 7}, "uid 7"),
    ],
)
def test_bad_fields_name_file_and_line(model, tmp_path, edit, match):
    import json

    path = tmp_path / "a.jsonl"
    write(model, path, records(2))
    lines = path.read_text().splitlines()
    lines[2] = json.dumps(edit(json.loads(lines[2])))
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(AnswerFileError, match=rf"a\.jsonl:3: .*{match}"):
        read_answers(path)


def test_replay_equals_capture_during_generate(model, tmp_path):
    cfg = tiny_flow_config(lens_features=True, state_summary="last")
    tok = CharTokenizer()
    path = tmp_path / "a.jsonl"
    answers = write(model, path, records(5), judge="record-label")  # label None -> record-label needs labels
    assert all(r.label is None for r in answers.records)
    recs = [
        Example(f"g:{i}", "qa", {"knowledge": "k", "question": f"q{i}?"}, reference="Ann", label=i % 2)
        for i in range(5)
    ]
    answers = write(model, tmp_path / "b.jsonl", recs, judge="record-label")
    parts = replay_answers(
        model, tok, tmp_path / "b.jsonl", tmp_path / "replay", config=cfg, part_size=2, include_partial=True
    )
    assert len(parts) == 3
    feats, labels, uids = load_parts(tmp_path / "replay")
    assert uids == [r.uid for r in answers.records] and labels.tolist() == [r.label for r in answers.records]
    ext = FlowExtractor(model, cfg, tokenizer=tok)
    for i, rec in enumerate(answers.records):
        ids = torch.tensor([tok(rec.prompt)["input_ids"]])
        _, live = capture_generate(ext, ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        t = len(rec.gen_ids)
        assert int(feats.valid[i, 0].sum()) == t
        torch.testing.assert_close(feats.values[i, :, :t], live.values[0, :, :t], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(feats.states[i], live.states[0], atol=1e-4, rtol=1e-4)
    # `flowcheck compare` reads the same part stores: the answers file gives each example, split at the
    # boundary the replay used.
    from hf_flowcheck.workflows.compare import examples_from_store
    from hf_flowcheck.workflows.replay import open_features

    examples = examples_from_store(open_features(tmp_path / "replay"), tok)
    by_uid = {r.uid: r for r in answers.records}
    for ex in examples:
        rec = by_uid[ex.uid]
        assert ex.answer_ids == rec.gen_ids and ex.label == rec.label
        assert int(feats.positions[uids.index(ex.uid), 0]) == len(ex.prompt_ids)


def test_replay_refuses_another_model(model, tmp_path):
    recs = [Example("g:0", "qa", {"knowledge": "k", "question": "q?"}, reference="Ann", label=0)]
    write(model, tmp_path / "a.jsonl", recs, judge="record-label")
    other = make_tiny_model("llama", seed=1)
    with pytest.raises(ValueError, match="another model"):
        replay_answers(other, CharTokenizer(), tmp_path / "a.jsonl", tmp_path / "r", config=tiny_flow_config())


def test_replayed_protocol_needs_answer_records(model, tmp_path):
    with pytest.raises(TypeError, match="AnswerRecord"):
        pl.extract_dataset(
            model,
            CharTokenizer(),
            records(2),
            tmp_path / "s",
            config=tiny_flow_config(),
            protocol="replayed",
            progress=False,
        )
    assert json  # keep the import honest for linters


def test_closed_book_prompt_is_the_qa_two_shot_without_knowledge():
    from hf_flowcheck.data import QA_SHOTS, generation_prompt
    from hf_flowcheck.data.datasets import Example
    from hf_flowcheck.workflows.answers import closed_book

    rec = Example("halueval_qa:77", "qa", {"knowledge": "Secret paragraph.", "question": "Who?"}, "Ann")
    prompt = generation_prompt(closed_book(rec))
    assert "Knowledge:" not in prompt and "Secret" not in prompt
    blocks = prompt.split("\n\n")
    assert blocks[-1] == "Question: Who?\nAnswer:"
    assert blocks[:2] == [f"Question: {s['question']}\nAnswer: {s['answer']}" for s in QA_SHOTS]
    # The open-book prompt of the same record keeps its knowledge and the shots' knowledge.
    assert generation_prompt(rec).count("Knowledge:") == 3


def _replayed_store(model, tmp_path) -> None:
    """84 answers (half labelled wrong) written and replayed into ``tmp_path / "replay"``."""
    recs = [
        Example(f"g:{i}", "qa", {"knowledge": "k", "question": f"q{i}?"}, reference="Ann", label=i % 2)
        for i in range(84)
    ]
    write(model, tmp_path / "a.jsonl", recs, judge="record-label", batch_size=12)
    replay_answers(
        model, CharTokenizer(), tmp_path / "a.jsonl", tmp_path / "replay", config=tiny_flow_config(), part_size=42
    )


@pytest.mark.parametrize("head", ["attention", "depth"])
def test_train_from_a_replayed_store_with_the_token_loss(model, tmp_path, head):
    from hf_flowcheck.workflows.experiments import train_from_store

    _replayed_store(model, tmp_path)
    kw = dict(epochs=2, head=head, hidden=16, embed=8, progress=False, n_bootstrap=20)
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        train_from_store(tmp_path / "replay", tmp_path / "v0", token_loss_weight=0.5, **kw)
    v, report = train_from_store(
        tmp_path / "replay", tmp_path / "v1", token_loss_weight=0.5, tokenizer=CharTokenizer(), **kw
    )
    hyper = v.training_metadata["hyperparameters"]
    assert hyper["token_loss_weight"] == 0.5 and len(hyper["token_labels"]) == 64
    assert report["history"]["epochs_run"] == 2


def test_the_token_label_rule_reaches_the_labels(model, tmp_path, monkeypatch):
    from hf_flowcheck.workflows import token_labels
    from hf_flowcheck.workflows.experiments import train_from_store

    _replayed_store(model, tmp_path)
    seen, real = [], token_labels.reference_token_labels
    monkeypatch.setattr(
        token_labels, "reference_token_labels", lambda *a, **k: seen.append(k.get("rule")) or real(*a, **k)
    )
    v, _ = train_from_store(
        tmp_path / "replay", tmp_path / "v", token_loss_weight=0.5, tokenizer=CharTokenizer(), epochs=1,
        hidden=16, embed=8, progress=False, n_bootstrap=20, token_label_rule="references+question",
    )  # fmt: skip
    assert seen == ["references+question"]
    assert v.training_metadata["train_config"]["token_label_rule"] == "references+question"

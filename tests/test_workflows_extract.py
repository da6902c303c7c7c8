"""extract_dataset on tiny models: paired and generated protocols, resume after a kill, refusals,
two accelerate processes == one, and the ``flowcheck extract`` arguments."""

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model, tiny_flow_config

from hf_flowcheck import FlowExtractor
from hf_flowcheck.data import Example, LabeledExample
from hf_flowcheck.workflows import extract as pl
from hf_flowcheck.workflows.store import MANIFEST_NAME, CorruptShardError, FeatureStore, shard_name

TESTS = Path(__file__).resolve().parent


class CharTokenizer:
    """Character tokenizer for the tiny models (vocab 99): 1 = BOS, 97 = newline, 98 = EOS, 0 = pad."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 98
    all_special_ids = (0, 1, 98)

    def __call__(self, text, add_special_tokens=True):
        ids = [1] if add_special_tokens else []
        ids += [97 if c == "\n" else (c_ord - 30 if 32 <= (c_ord := ord(c)) <= 126 else 2) for c in text]
        return {"input_ids": ids}

    def decode(self, ids, skip_special_tokens=True):
        out = []
        for i in map(int, ids):
            if i in self.all_special_ids:
                out.append("" if skip_special_tokens else f"<{i}>")
            else:
                out.append("\n" if i == 97 else chr(i + 30))
        return "".join(out)


def paired(n=6):
    out = []
    for i in range(n):
        prompt = f"Q{i}: who?\nAnswer:"
        out.append(LabeledExample(f"r:{i}", "qa", prompt, "Ann" if i % 3 else "Bob Smith.", 0, "right"))
        out.append(LabeledExample(f"r:{i}", "qa", prompt, f"a made-up answer {i}.", 1, "hallucinated"))
    return out


def records(n=6):
    return [Example(f"g:{i}", "qa", {"knowledge": "k", "question": f"q{i}?"}, reference="Ann") for i in range(n)]


def short_prompt(ex):
    return f"Question: {ex.prompt_fields['question']}\nAnswer:"


def run(model, out, examples=None, **kw):
    kw = {"config": tiny_flow_config(), "protocol": "paired", "batch_size": 3, "shard_size": 4, "progress": False, **kw}
    return pl.extract_dataset(model, CharTokenizer(), paired() if examples is None else examples, out, **kw)


def assert_same_features(a, b):
    fa, la, ua = a.load()
    fb, lb, ub = b.load()
    assert ua == ub and torch.equal(la, lb)
    assert torch.equal(fa.values, fb.values) and torch.equal(fa.valid, fb.valid)
    assert torch.equal(fa.positions, fb.positions) and fa.sample_keys == fb.sample_keys


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("llama")


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    """One uninterrupted paired extraction that other tests compare against."""
    return run(model, tmp_path_factory.mktemp("ref") / "store")


def test_paired_matches_single_sample_extraction(model, reference):
    tok = CharTokenizer()
    manifest = reference.manifest
    assert manifest["status"] == "complete" and manifest["protocol"] == "paired"
    assert [e["file"] for e in reference.shards] == [shard_name(i) for i in range(3)]  # 12 samples / 4
    assert manifest["counts"] == {
        "inputs": 12,
        "stored": 12,
        "label_0": 6,
        "label_1": 6,
        "dropped": 0,
        "failed": 0,
        "excluded": 0,
    }
    assert manifest["model_fingerprint"]["model_type"] == "llama" and manifest["num_blocks"] == 4
    assert manifest["flow_config"] == tiny_flow_config().to_dict() and manifest["hf_flowcheck_version"]
    feats, labels, uids = reference.load()
    assert feats.values.shape[:2] == (12, 4) and labels.tolist() == [0, 1] * 6
    assert uids == [e.uid for e in paired()]
    ext = FlowExtractor(model, tiny_flow_config(), tokenizer=tok)
    for i, ex in enumerate(paired()[:4]):
        n_prompt = len(tok(ex.prompt)["input_ids"])
        ids = torch.tensor([tok(ex.text)["input_ids"]])
        resp = torch.zeros_like(ids)
        resp[:, n_prompt:] = 1
        alone = ext.extract(ids, response_mask=resp)
        t = alone.values.shape[2]
        assert t == len(ex.completion)  # one token per answer character
        torch.testing.assert_close(feats.values[i, :, :t], alone.values[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(feats.positions[i, :t], alone.positions[0]) and not feats.valid[i, :, t:].any()
        assert feats.sample_keys[i] == alone.sample_keys[0]


def kill_after_first_shard(model, out, monkeypatch):
    """Run an extraction into ``out`` that is killed right after shard 0 is written."""

    def crash(index):
        if index == 0:
            raise KeyboardInterrupt("simulated kill after shard 0")

    monkeypatch.setattr(pl, "_after_shard_hook", crash)
    with pytest.raises(KeyboardInterrupt):
        run(model, out)


def test_resume_after_kill_equals_uninterrupted_run(model, reference, tmp_path, monkeypatch):
    out = tmp_path / "store"

    kill_after_first_shard(model, out, monkeypatch)
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, shard_name(0)]  # nothing partial, no temp
    assert json.loads((out / MANIFEST_NAME).read_text())["status"] == "in_progress"
    with pytest.raises(Exception, match="has not finished"):
        FeatureStore.open(out)
    mtime = (out / shard_name(0)).stat().st_mtime_ns
    # A SIGKILL mid-write would leave a hidden temp file: the next run removes it.
    (out / f".tmp-{shard_name(1)}.abc").write_bytes(b"partial")

    extracted = []
    monkeypatch.setattr(pl, "_after_shard_hook", extracted.append)
    store = run(model, out)
    assert extracted == [1, 2]  # shard 0 was reused, not recomputed
    assert (out / shard_name(0)).stat().st_mtime_ns == mtime
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME] + [shard_name(i) for i in range(3)]
    assert_same_features(store, reference)
    assert store.manifest["counts"] == reference.manifest["counts"]
    assert [e["sha256"] for e in store.shards] == [e["sha256"] for e in reference.shards]
    # Running again on a complete store does nothing.
    extracted.clear()
    run(model, out)
    assert extracted == []


def test_mismatched_setup_is_refused(model, reference, tmp_path):
    out = reference.path
    with pytest.raises(pl.ExtractionMismatchError, match=r"FlowConfig differs: boundary: stored 'normalized'"):
        run(model, out, config=tiny_flow_config(boundary="residual"))
    with pytest.raises(pl.ExtractionMismatchError, match=r"(?s)model fingerprint differs: readout_sha256.*new out_dir"):
        run(make_tiny_model("llama", seed=1), out)
    with pytest.raises(pl.ExtractionMismatchError, match="protocol differs"):
        run(model, out, protocol="natural")
    with pytest.raises(pl.ExtractionMismatchError, match="dataset"):
        run(model, out, examples=paired(5))
    with pytest.raises(FileExistsError, match="resume=False"):
        run(model, out, resume=False)


def test_deleted_manifest_readopts_its_own_shards_and_refuses_foreign_ones(model, reference, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(reference.path, out)
    (out / MANIFEST_NAME).unlink()
    extracted = []
    monkeypatch.setattr(pl, "_after_shard_hook", extracted.append)
    store = run(model, out)
    assert extracted == []  # every shard re-adopted after checking what it holds
    assert_same_features(store, reference)
    # Shards of another FlowConfig and no manifest: refused, and nothing is overwritten.
    (out / MANIFEST_NAME).unlink()
    before = (out / shard_name(0)).read_bytes()
    with pytest.raises(
        pl.FeatureStoreError, match=r"shard-00000\.safetensors was written for other examples or another setup"
    ):
        run(model, out, config=tiny_flow_config(boundary="residual"))
    assert (out / shard_name(0)).read_bytes() == before and not (out / MANIFEST_NAME).exists()


def test_unlisted_shard_of_another_setup_is_not_adopted(model, reference, tmp_path, monkeypatch):
    other = run(model, tmp_path / "other", config=tiny_flow_config(boundary="residual"))
    out = tmp_path / "store"

    kill_after_first_shard(model, out, monkeypatch)
    # A shard of the other setup lands in the store before the manifest lists it.
    (out / shard_name(1)).write_bytes((other.path / shard_name(1)).read_bytes())
    extracted = []
    monkeypatch.setattr(pl, "_after_shard_hook", extracted.append)
    store = run(model, out)
    assert extracted == [1, 2]  # re-extracted, not adopted
    assert_same_features(store, reference)


def test_corrupted_shard_is_reported_on_resume(model, reference, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(reference.path, out)
    path = out / shard_name(2)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=r"shard-00002\.safetensors.*Delete it"):
        FeatureStore.open(out)
    with pytest.raises(CorruptShardError, match=r"shard-00002\.safetensors"):
        run(model, out)
    path.unlink()  # the fix the message gives
    assert_same_features(run(model, out), reference)


def test_generated_protocol_with_fake_judge(model, tmp_path):
    tok = CharTokenizer()
    seen = []

    def judge(question, answer, reference, knowledge):
        seen.append((question, answer, reference))
        return None if question == "q1?" else int(len(answer) % 2)

    common = dict(protocol="generated", judge=judge, prompt_fn=short_prompt, max_new_tokens=6, shard_size=4)
    store = run(model, tmp_path / "gen", records(6), postprocess=None, **common)
    assert store.manifest["counts"]["inputs"] == 6 and store.manifest["counts"]["dropped"] == 1
    assert store.manifest["generation"]["max_new_tokens"] == 6
    feats, labels, uids = store.load()
    assert uids == ["g:0", "g:2", "g:3", "g:4", "g:5"] and len(seen) == 6 and seen[0][2] == "Ann"
    samples = store.samples()
    assert [s["label"] for s in samples] == labels.tolist() == [len(s["answer"]) % 2 for s in samples]
    # Features of the generated tokens equal a teacher-forced replay of prompt + generated tokens.
    ext = FlowExtractor(model, tiny_flow_config(), tokenizer=tok)
    for i, s in enumerate(samples[:2]):
        prompt = short_prompt(records(6)[s["index"]])
        ids = tok(prompt)["input_ids"] + tok(s["answer"], add_special_tokens=False)["input_ids"]
        resp = torch.zeros(1, len(ids), dtype=torch.long)
        resp[:, len(tok(prompt)["input_ids"]) :] = 1
        replay = ext.extract(torch.tensor([ids]), response_mask=resp)
        t = replay.values.shape[2]
        assert t == int(feats.valid[i, 0].sum())
        assert torch.equal(feats.positions[i, :t], replay.positions[0])
        torch.testing.assert_close(feats.values[i, :, :t], replay.values[0], atol=1e-4, rtol=1e-4)

    # Default post-processing (first line): stored features cover only the judged answer's tokens.
    store = run(model, tmp_path / "gen_clean", records(6), **{**common, "judge": lambda *a: 0})
    feats, _, _ = store.load()
    for i, s in enumerate(store.samples()):
        assert "\n" not in s["answer"] and s["answer"] == s["raw_answer"].lstrip().split("\n", 1)[0].strip()
        n = int(feats.valid[i, 0].sum())
        plen = len(tok(short_prompt(records(6)[s["index"]]))["input_ids"])
        assert n >= len(s["answer"]) and feats.positions[i, :n].max() < plen + len(s["raw_answer"]) + 1


def test_argument_checks(model, tmp_path):
    with pytest.raises(ValueError, match="protocol='sampled' is not supported"):
        run(model, tmp_path / "x", protocol="sampled")
    with pytest.raises(ValueError, match="shard_size=0 must be a positive integer"):
        run(model, tmp_path / "x", shard_size=0)
    with pytest.raises(TypeError, match="protocol='generated' needs source records"):
        run(model, tmp_path / "x", protocol="generated")
    with pytest.raises(TypeError, match="needs LabeledExample"):
        run(model, tmp_path / "x", examples=records(2))


def test_cli_arguments_and_run(model, tmp_path, monkeypatch, capsys):
    import hf_flowcheck.offline_models as om

    data = tmp_path / "mini.jsonl"
    with open(data, "w") as f:
        for i in range(3):
            row = {"knowledge": "k", "question": f"q{i}?", "right_answer": "Ann", "hallucinated_answer": "Bob Jr."}
            f.write(json.dumps(row) + "\n")
    monkeypatch.setattr(om, "load_model", lambda name, **kw: (model, CharTokenizer()))
    from hf_flowcheck.cli import build_parser, main

    parser = build_parser()
    tiny = ["--window-length", "2", "--window-stride", "1", "--subspace-dim", "4", "--num-competitors", "4"]
    args = ["extract", "--dataset", str(data), "--protocol", "paired", "--out", str(tmp_path / "o"), "--no-progress"]
    assert main([*args, *tiny]) == 0
    store = FeatureStore.open(tmp_path / "o")
    assert len(store) == 6 and store.config == tiny_flow_config(direction_cap=1024)
    assert "Wrote 6 samples" in capsys.readouterr().out
    bad = ["extract", "--dataset", str(data), "--out", str(tmp_path / "o"), "--boundary", "residual", *tiny]
    assert main(bad) == 2
    assert "different setup" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["extract", "--dataset", "x", "--out", "y", "--boundary", "raw"])


ACCELERATE_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from accelerate import PartialState
from conftest import make_tiny_model, tiny_flow_config
from test_workflows_extract import CharTokenizer, paired
from hf_flowcheck.workflows import extract
from hf_flowcheck.workflows.extract import extract_dataset

# One write per line: two processes share the pipe, and a single small write is atomic.
extract._after_shard_hook = lambda i: sys.stdout.write(f"wrote shard {{i}} in {{PartialState().process_index}}\\n")
# accelerator=None: extract_dataset joins the launched process group itself (WORLD_SIZE=2).
store = extract_dataset(make_tiny_model("llama"), CharTokenizer(), paired(), sys.argv[1], config=tiny_flow_config(),
                        protocol="paired", batch_size=3, shard_size=4, progress=False)
state = PartialState()
sys.stdout.write(f"process {{state.process_index}} of {{state.num_processes}} samples {{len(store)}}\\n")
sys.stdout.flush()
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_accelerate_processes_equal_one(reference, tmp_path):
    script = tmp_path / "extract_two.py"
    script.write_text(ACCELERATE_SCRIPT.format(tests=str(TESTS)))
    out = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent), "CUDA_VISIBLE_DEVICES": ""}
    # `accelerate launch --cpu --num_processes 2` starts ONE process (multi-CPU needs mpirun); `--multi_gpu`
    # starts two via torchrun, and on a CPU-only machine the pipeline's PartialState(cpu=True) uses gloo.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--main_process_port", str(_free_port()), str(script), str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "process 0 of 2 samples 12" in proc.stdout and "process 1 of 2 samples 12" in proc.stdout
    wrote = sorted(line for line in proc.stdout.splitlines() if line.startswith("wrote"))
    assert wrote == ["wrote shard 0 in 0", "wrote shard 1 in 1", "wrote shard 2 in 0"]  # shard i -> process i % 2
    store = FeatureStore.open(out)
    assert_same_features(store, reference)
    assert [e["sha256"] for e in store.shards] == [e["sha256"] for e in reference.shards]
    assert store.manifest["counts"] == reference.manifest["counts"]
    print(f"two-process extraction took {time.perf_counter() - t0:.1f} s")


def test_extract_sample_is_a_seeded_subset_in_file_order():
    from hf_flowcheck.cli.research import _load_records

    def load(**kw):
        base = dict(dataset="selfaware", data_dir=None, limit=None, task=None, sample=None, sample_seed=0)
        return _load_records(argparse.Namespace(**{**base, **kw}))

    full = load()
    a, b, c = load(sample=60), load(sample=60), load(sample=60, sample_seed=1)
    assert [r.uid for r in a] == [r.uid for r in b] != [r.uid for r in c]
    order = {r.uid: i for i, r in enumerate(full)}
    assert [order[r.uid] for r in a] == sorted(order[r.uid] for r in a)
    assert {r.label for r in a} == {0, 1}  # the file's first 2,337 records are all answerable
    assert len(load(limit=10, sample=50)) == 10
    with pytest.raises(ValueError, match="--sample 0"):
        load(sample=0)


def test_a_second_store_writer_is_refused_with_the_holders_pid(tmp_path):
    import os

    from hf_flowcheck.errors import WriterBusyError
    from hf_flowcheck.filelocks import exclusive_writer

    model = make_tiny_model("llama")
    out = tmp_path / "store"
    with exclusive_writer(out, "feature store"), pytest.raises(WriterBusyError, match=f"PID {os.getpid()}"):
        run(model, out)
    assert not out.exists()
    assert len(run(model, out)) > 0  # free again

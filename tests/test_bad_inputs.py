"""Hostile inputs at the command line and at the loaders: one clear line, exit status 2, no traceback."""

from __future__ import annotations

import pytest

from hf_flowcheck.cli import main


def run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["generate", "q?", "--model", "./no/such/model"], "no such folder"),
        (["generate", "q?", "--model", "~/no-such-model-dir"], "no such folder"),
        (["generate", "q?", "--max-new-tokens", "0"], "pass an integer >= 1"),
        (["generate", "q?", "--threshold", "7"], "outside [0, 1]"),
        (["generate", "q?", "--threshold", "high"], "not a number"),
        (["extract", "--dataset", "halueval-qa", "--out", "x", "--dtype", "bogus"], "invalid choice"),
        (["answers", "--out", "x.jsonl", "--batch-size", "0"], "pass an integer >= 1"),
        (["answers", "--out", "x.jsonl", "--dataset", "trivia"], "invalid choice"),
        (["train", "--features", "./no-such-store", "--out", "v"], "no-such-store"),
        (["evaluate", "--validator", "./no/such/validator", "--features", "x"], "no such"),
        (["answers", "--out", ".", "--limit", "1"], "it is a folder where a file is needed; pass another path"),
    ],
)
def test_cli_refuses_with_one_line(argv, needle, capsys):
    code, err = run(argv, capsys)
    assert code == 2
    assert needle in err


def test_validator_folder_typo_is_named(tmp_path):
    from hf_flowcheck.modeling import _load_validator

    with pytest.raises(FileNotFoundError, match=r"validator '\./no/such/v': no such folder"):
        _load_validator("./no/such/v")


def test_validator_without_fingerprint_is_refused():
    import torch
    from conftest import make_tiny_model

    from hf_flowcheck import FlowCheckedModelForCausalLM
    from hf_flowcheck.detectors import FlowValidator, ValidatorConfig

    model = make_tiny_model("llama")
    v = FlowValidator(ValidatorConfig(num_features=10, hidden=8, embed=4, gru_hidden=4))
    with pytest.raises(ValueError, match="check_compatibility=False"):
        FlowCheckedModelForCausalLM(model, v)
    fc = FlowCheckedModelForCausalLM(model, v, check_compatibility=False)  # the explicit opt-out
    assert fc.validator is v and torch.is_tensor(v.feature_shift)


# ------------------------------------------------------------------- silently wrong, now refused
def _wrapped():
    from conftest import tiny_wrapped

    return tiny_wrapped()


class _Force:
    """Logits processor that forces ``token`` at generated step ``step`` (0-based)."""

    def __init__(self, prompt_len: int, step: int, token: int) -> None:
        self.prompt_len, self.step, self.token = prompt_len, step, token

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] - self.prompt_len == self.step:
            scores = scores.clone()
            scores[:] = -float("inf")
            scores[:, self.token] = 0.0
        return scores


def test_per_call_eos_token_ends_the_scored_answer():
    import torch
    from transformers import LogitsProcessorList

    fc = _wrapped()
    ids = torch.tensor([[1, 5, 6, 7]])
    kw = dict(max_new_tokens=6, do_sample=False, return_flow_scores=True, pad_token_id=0)
    force = LogitsProcessorList([_Force(4, 2, 42)])
    out = fc.generate(input_ids=ids, eos_token_id=42, logits_processor=force, **kw)
    # Two answer tokens, then the per-call end token 42: it and nothing after it is scored.
    assert out.sequences[0, 4 + 2].item() == 42
    assert (out.flow_positions[0] >= 0).sum().item() == 2


def test_abstention_message_is_never_cut_mid_word():
    import torch

    fc = _wrapped()
    msg = "I am not sure about this at all."
    ids = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 10]])
    kw = dict(do_sample=False, pad_token_id=0, flow_check_every=1, flow_abstain_threshold=0.0)
    from types import SimpleNamespace

    from test_baselines import CharTokenizer

    class Tok(CharTokenizer):
        def __call__(self, text, add_special_tokens=True):
            return SimpleNamespace(**super().__call__(text, add_special_tokens))

    fc.tokenizer = Tok()
    out = fc.generate(input_ids=ids, max_new_tokens=4, flow_abstain_message=msg, **kw)
    answers = [fc.tokenizer.decode(row[4:]) for row in out.sequences]
    assert out.flow_abstained.all()
    assert all(msg.strip() not in a and "I am" not in a for a in answers)  # too long for the budget: not started
    full = fc.generate(input_ids=ids, max_new_tokens=48, flow_abstain_message=msg, **kw)
    assert all(msg in fc.tokenizer.decode(row[4:]) for row in full.sequences)


def test_detector_folder_mixed_from_two_saves_is_refused(tmp_path):
    import shutil

    from hf_flowcheck.detectors import FlowValidator
    from hf_flowcheck.errors import CheckpointError

    a, b = _wrapped().validator, _wrapped().validator
    with __import__("torch").no_grad():
        next(b.parameters()).add_(1.0)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    shutil.copy(tmp_path / "b" / "model.safetensors", tmp_path / "a" / "model.safetensors")
    with pytest.raises(CheckpointError, match="sha256 differs"):
        FlowValidator.from_pretrained(tmp_path / "a")


def test_half_precision_model_is_named_in_the_refusal():
    import torch

    from hf_flowcheck import FlowCheckedModelForCausalLM
    from hf_flowcheck.errors import FingerprintMismatchError

    fc = _wrapped()
    with pytest.raises(FingerprintMismatchError, match=r"bfloat16.*dtype=torch\.float32"):
        FlowCheckedModelForCausalLM(fc.base_model.to(torch.bfloat16), fc.validator)


def test_non_utf8_jsonl_names_the_file_and_line(tmp_path):
    from hf_flowcheck.data import load_jsonl
    from hf_flowcheck.errors import DataFormatError

    path = tmp_path / "latin1.jsonl"
    good = b'{"knowledge": "k", "question": "q?", "right_answer": "a", "hallucinated_answer": "b"}\n'
    path.write_bytes(good + good.replace(b"q?", b"caf\xe9?"))
    with pytest.raises(DataFormatError, match=r"latin1\.jsonl line 2: not UTF-8 text \(byte 0xe9"):
        load_jsonl(path, task="qa")
    assert len(load_jsonl(path, task="qa", on_error="skip")) == 1


def test_wrapper_save_is_all_or_nothing(tmp_path):
    import torch

    from hf_flowcheck import FlowCheckedModelForCausalLM

    fc = _wrapped()
    fc.save_pretrained(tmp_path / "saved")
    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "saved").rglob("*") if p.is_file()}
    fc.validator.training_metadata["bad"] = torch.zeros(2)  # not JSON: the validator's save raises
    with pytest.raises(ValueError):
        fc.save_pretrained(tmp_path / "saved")
    after = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "saved").rglob("*") if p.is_file()}
    assert after == before
    del fc.validator.training_metadata["bad"]
    again = FlowCheckedModelForCausalLM(fc.base_model, str(tmp_path / "saved"))
    assert again.flow_config == fc.flow_config and again.validator is not None

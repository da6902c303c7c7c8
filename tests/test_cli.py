"""The `flowcheck` command on a tiny model saved to a folder."""

import pytest
import torch
from conftest import make_tiny_model, tiny_flow_config
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hf_flowcheck.cli import build_parser, main
from hf_flowcheck.detectors.flow_validator import FlowValidator, ValidatorConfig


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = make_tiny_model("llama")
    model.generation_config.eos_token_id = 98
    model.save_pretrained(root / "model")
    vocab = {f"w{i}": i for i in range(99)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="w3"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="w98", pad_token="w0", bos_token="w1").save_pretrained(
        root / "model"
    )
    cfg = tiny_flow_config()
    torch.manual_seed(0)
    v = FlowValidator(
        ValidatorConfig.from_feature_names(cfg.feature_names, hidden=8, embed=8, gru_hidden=8), flow_config=cfg
    )
    v.set_base_model(model)
    v.save_pretrained(root / "validator")
    return root


def test_generate_prints_score_and_culprit(folders, capsys, tmp_path):
    heat = tmp_path / "heat.png"
    rc = main(
        [
            "generate",
            "w5 w6 w7 w8",
            "--model",
            str(folders / "model"),
            "--validator",
            str(folders / "validator"),
            "--raw-prompt",
            "--max-new-tokens",
            "6",
            "--heatmap",
            str(heat),
        ]
    )
    captured = capsys.readouterr()
    out = captured.out
    assert rc == 0
    assert "Flow score:" in out and "Culprit:" in out and "block" in out
    assert heat.is_file() and heat.stat().st_size > 1000
    assert "Warning: --raw-prompt" in captured.err  # not the format the validators were trained on


def test_generate_without_validator_says_how_to_get_one(folders, capsys):
    rc = main(["generate", "w5 w6", "--model", str(folders / "model"), "--raw-prompt", "--heatmap", ""])
    assert rc == 2
    assert "--validator" in capsys.readouterr().err


def test_report_writes_html(folders, tmp_path):
    out = tmp_path / "r.html"
    rc = main(
        [
            "report",
            "w5 w6 w7",
            "w8 w9",
            "--model",
            str(folders / "model"),
            "--validator",
            str(folders / "validator"),
            "--max-new-tokens",
            "4",
            "--refine",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    html = out.read_text()
    assert html.count("<svg") >= 2 and "http://" not in html and "https://" not in html


@pytest.mark.parametrize("command", [None, *sorted(build_parser()._subparsers._group_actions[0].choices)])
def test_every_help_page_renders(command, capsys):
    argv = ["--help"] if command is None else [command, "--help"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert "usage: flowcheck" in capsys.readouterr().out


def test_demo_samples_are_the_dataset_records():
    from hf_flowcheck import data
    from hf_flowcheck.cli.generation import DEMO_SAMPLES

    recs = {r.uid: r for r in data.load_halueval("qa", None)}
    assert DEMO_SAMPLES[0][1] is None and DEMO_SAMPLES[0][3] == "chat"  # first: closed-book, chat template
    for uid, (question, knowledge, reference, _) in zip(("halueval_qa:4881", "halueval_qa:9022"), DEMO_SAMPLES[1:]):
        fields = recs[uid].prompt_fields
        assert (fields["question"], fields["knowledge"]) == (question, knowledge)
        assert reference in recs[uid].references


def test_the_verdict_and_the_format_warning_follow_the_validators_prompt_styles(capsys):
    from types import SimpleNamespace

    from hf_flowcheck.cli.generation import VERDICT_POINT, _threshold, _warn_format
    from hf_flowcheck.detectors import FlowValidator, ValidatorConfig

    v = FlowValidator(ValidatorConfig(num_features=4, hidden=8, embed=4, gru_hidden=4))
    v.training_metadata = {
        "prompt_styles": ["chat", "plain"],
        "operating_points": {VERDICT_POINT: {"threshold": 0.7}},
        "operating_points_by_group": {"chat": {"n": 50, VERDICT_POINT: {"threshold": 0.85}}},
    }
    _warn_format(v, "chat", None, raw_prompt=False)
    assert capsys.readouterr().err == ""
    _warn_format(v, "chat-fewshot", None, raw_prompt=False)
    assert "trained on the prompt styles chat, plain, not 'chat-fewshot'" in capsys.readouterr().err
    assert _threshold(v, "chat", None)[0] == 0.85  # chosen on that style's validation answers
    assert _threshold(v, "plain", None)[0] == 0.5  # no point for that style: the balanced point, said so
    assert _threshold(v, "chat", 0.3) == (0.3, "--threshold")
    old = SimpleNamespace(training_metadata={})  # a validator trained on HaluEval-QA only
    _warn_format(old, "halueval", "a passage", raw_prompt=False)
    assert capsys.readouterr().err == ""
    _warn_format(old, "chat", None, raw_prompt=False)
    assert "HaluEval-QA two-shot prompts" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], None),
        (["--lens-features"], True),
        (["--no-lens-features"], False),
        (["--no-score-terminators"], False),
    ],
)
def test_boolean_config_options_are_real_flags(argv, expected, tmp_path):
    from hf_flowcheck.cli import build_parser

    base = ["extract", "--dataset", "halueval-qa", "--out", str(tmp_path)]
    args = build_parser().parse_args(base + argv)
    flag = argv[0].lstrip("-").replace("no-", "").replace("-", "_") if argv else "lens_features"
    assert getattr(args, f"flow_{flag}", None) is expected  # not given: no attribute, the config's default
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--lens-features", "False"])  # no longer read as True

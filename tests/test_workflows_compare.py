"""Side-by-side comparison, abstention policy, fused detector and the gradient layer ablation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_tiny_model, tiny_flow_config
from test_baselines import CharTokenizer as _CharTokenizer

from hf_flowcheck.detectors.base import NotFittedError, ScoredExample
from hf_flowcheck.detectors.baselines import (
    AnswerLengthDetector,
    HiddenStateProbe,
    SamplingAgreementDetector,
    TokenConfidenceDetector,
)
from hf_flowcheck.detectors.checkpoint import jsonable
from hf_flowcheck.detectors.flow_validator import FlowValidator, ValidatorConfig
from hf_flowcheck.detectors.gradient import GradientConfig, GradientDetector
from hf_flowcheck.workflows.compare import (
    FlowValidatorDetector,
    FusedDetector,
    GenerationTiming,
    abstention_policy,
    apply_abstention,
    compare_detectors,
    examples_from_store,
    gradient_layer_ablation,
)


class CharTokenizer(_CharTokenizer):
    """The test tokenizer without a chat template (plain prompts)."""

    chat_template = None


# ------------------------------------------------------------------------------- abstention
def test_abstention_policy_is_chosen_on_validation() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = y + rng.normal(0, 0.8, 200)  # informative scores
    for target in (0.05, 0.1, 0.2, 0.3):
        pol = abstention_policy(s, y, target)
        assert pol["risk"] is None or pol["risk"] <= target
        out = apply_abstention(s, y, pol["threshold"])  # on validation itself: the same numbers
        assert out["coverage"] == pytest.approx(pol["coverage"])
        if out["risk"] is not None:
            assert out["risk"] <= target
        # largest coverage: answering one more distinct score would break the target
        higher = np.sort(np.unique(s[s > pol["threshold"]]))
        if higher.size:
            assert y[s <= higher[0]].mean() > target
    # the threshold comes from validation only: test scores do not move it
    pol = abstention_policy(s, y, 0.1)
    test = apply_abstention(s + 10, y, pol["threshold"])
    assert test["coverage"] == 0.0 and test["risk"] is None


def test_abstention_policy_edge_cases() -> None:
    p = abstention_policy([0.9, 0.8], [1, 1], 0.1)
    assert p["threshold"] == float("-inf") and p["coverage"] == 0.0
    p = abstention_policy([0.1, 0.1, 0.2], [0, 1, 0], 0.4)  # the tie is kept together
    assert p["coverage"] == 1.0 and p["risk"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="target_risk"):
        abstention_policy([0.1], [0], 1.5)


def test_fused_detector() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 100)
    cols = {"a": y + rng.normal(0, 1, 100), "b": -y + rng.normal(0, 1, 100), "c": rng.normal(0, 1, 100)}
    fused = FusedDetector()
    with pytest.raises(NotFittedError):
        fused.score(cols)
    fused.fit(cols, y)
    s = fused.score(cols)
    assert s.shape == (100,) and np.all((s > 0) & (s < 1))
    w = fused.weights()
    assert w["a"] > 0 > w["b"]
    with pytest.raises(ValueError, match="at least two"):
        FusedDetector().fit({"a": cols["a"]}, y)


# ------------------------------------------------------------------------------- comparison
def _examples(n_uids: int = 12, seed: int = 0) -> list[ScoredExample]:
    """Paired-style synthetic data: per uid a short 'right' and a longer 'hallucinated' answer."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for u in range(n_uids):
        prompt = [1, *torch.randint(3, 90, (5,), generator=g).tolist()]
        for label in (0, 1):
            answer = torch.randint(3, 90, (2 + 2 * label,), generator=g).tolist()
            text = "".join(chr(i - 3 + 32) for i in answer)
            out.append(
                ScoredExample(
                    prompt, answer, label=label, uid=f"r{u}", answer=text, source=("right", "hallucinated")[label]
                )
            )
    return out


def _split(examples: list[ScoredExample]) -> dict[str, list[str]]:
    uids = sorted({e.uid for e in examples}, key=lambda u: int(u[1:]))
    return {"train": uids[:6], "validation": uids[6:9], "test": uids[9:]}


def test_compare_detectors_end_to_end() -> None:
    model = make_tiny_model("llama")
    tok = CharTokenizer()
    examples = _examples()
    fcfg = tiny_flow_config()
    validator = FlowValidator(
        ValidatorConfig.from_feature_names(fcfg.feature_names, hidden=8, embed=8, gru_hidden=8), flow_config=fcfg
    ).eval()
    detectors = [
        FlowValidatorDetector(validator, tokenizer=tok),
        GradientDetector(GradientConfig(layers=2, sketch=4, reader="logistic", epochs=5)),
        HiddenStateProbe(layers=[-1, -2]),
        *[TokenConfidenceDetector(s) for s in ("mean_logprob", "min_logprob", "mean_entropy", "perplexity")],
        SamplingAgreementDetector(2, max_new_tokens=3),
        AnswerLengthDetector(),
    ]
    report = compare_detectors(
        model,
        tok,
        examples,
        _split(examples),
        detectors,
        protocol="paired",
        n_bootstrap=20,
        timing=GenerationTiming(max_new_tokens=4),
        target_risk=0.3,
    )
    rows = report["rows"]
    assert report["sizes"] == {"train": 12, "validation": 6, "test": 6}
    assert "answer length (tokens)" in rows and rows["answer length (tokens)"]["metrics"]["auroc"]["value"] == 1.0
    fused = rows["fused (stacked logistic regression)"]
    assert set(fused["components"]) >= {"flow validator", "token confidence: perplexity"}
    assert any(c.startswith("hidden-state probe") for c in fused["components"])
    for name, row in rows.items():
        assert row["n"] == 6 and row["cost_ratio"] > 0, name
        assert row["metrics"]["auroc"]["low"] is not None or row["metrics"]["auroc"]["value"] is not None
        pol = row["abstention"]["validation"]
        assert pol["risk"] is None or pol["risk"] <= 0.3
        assert 0.0 <= row["abstention"]["test"]["coverage"] <= 1.0
        assert len(report["scores"][name]["test"]) == 6
    assert detectors[1].is_fitted and detectors[2].is_fitted
    json.dumps(jsonable(report, "report"))  # JSON-serialisable
    # the length control is skipped outside the paired protocol
    again = compare_detectors(
        model,
        tok,
        examples,
        _split(examples),
        [AnswerLengthDetector(), TokenConfidenceDetector()],
        protocol="generated",
        n_bootstrap=5,
        timing=GenerationTiming(max_new_tokens=2),
    )
    assert "answer length (tokens)" in again["skipped"] and "fused" in again["skipped"]


def test_compare_rejects_bad_split() -> None:
    model = make_tiny_model("llama")
    ex = _examples(4)
    with pytest.raises(ValueError, match="validation split holds none"):
        compare_detectors(model, None, ex, {"train": ["r0"], "validation": [], "test": ["r1"]}, [])


def test_gradient_layer_ablation() -> None:
    model = make_tiny_model("gpt_neox")
    ex = _examples(8)
    parts = {
        k: [e for e in ex if e.uid in set(v)]
        for k, v in {"train": ["r0", "r1", "r2", "r3"], "validation": ["r4", "r5"], "test": ["r6", "r7"]}.items()
    }
    res = gradient_layer_ablation(
        model,
        parts["train"],
        parts["validation"],
        parts["test"],
        config=GradientConfig(sketch=4, reader="logistic", epochs=3),
        band=2,
        n_bootstrap=10,
        cost_examples=2,
    )
    assert [b["blocks"] for b in res["bands"]] == [[0, 1], [1, 2], [2, 3]]
    assert res["last_band"]["blocks"] == [2, 3] and res["all"]["blocks"] == [0, 1, 2, 3]
    assert res["cost"]["last_band_ratio"] > 0 and res["cost"]["all_ratio"] > 0
    a_all, a_last = res["all"]["auroc"], res["last_band"]["auroc"]
    if a_all is not None and a_last is not None and a_all != 0.5:
        assert res["share_last_band"] == pytest.approx((a_last - 0.5) / (a_all - 0.5))


# ------------------------------------------------------------------------------- from a store
def test_examples_from_store_and_run_compare(tmp_path, monkeypatch, capsys) -> None:
    from hf_flowcheck import offline_models
    from hf_flowcheck.cli import build_parser, main
    from hf_flowcheck.cli.research import _gradient_config
    from hf_flowcheck.data import load_jsonl, paired_examples
    from hf_flowcheck.workflows.extract import extract_dataset

    path = tmp_path / "qa.jsonl"
    rows = [
        {"knowledge": f"K{i}.", "question": f"Q{i}?", "right_answer": f"A{i}", "hallucinated_answer": f"Wrong {i}."}
        for i in range(10)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = CharTokenizer()
    model = make_tiny_model("llama")
    examples = paired_examples(load_jsonl(path, task="qa"))
    store = extract_dataset(
        model,
        tok,
        examples,
        tmp_path / "feats",
        config=tiny_flow_config(),
        protocol="paired",
        progress=False,
        dataset={"name": str(path), "limit": None},
    )
    rebuilt = examples_from_store(store, tok)
    assert len(rebuilt) == 20
    assert sorted((e.uid, e.label) for e in rebuilt) == sorted((e.uid, e.label) for e in examples)
    for e in rebuilt:
        assert tok.decode(e.answer_ids).strip() == e.answer
    # Extraction and comparison split prompt and answer by the same rule (tokenize_prompt_answer).
    feats, _, uids = store.load()
    by_uid = {e.uid: e for e in rebuilt}
    for i, uid in enumerate(uids):
        assert int(feats.positions[i, 0]) == len(by_uid[uid].prompt_ids)

    defaults = build_parser().parse_args(["compare", "--features", "x"])
    assert defaults.samples == 5 and defaults.target_risk == 0.1
    assert _gradient_config(defaults) == GradientConfig(seed=0)  # the flags restate no default
    given = build_parser().parse_args(
        ["compare", "--features", "x", "--seed", "3", "--gradient-layers", "0,-1", "--gradient-sketch", "exact",
         "--gradient-reader", "logistic", "--gradient-abstention-patterns", "no idea"]
    )  # fmt: skip
    assert _gradient_config(given) == GradientConfig(
        layers=[0, -1], sketch=None, reader="logistic", seed=3, abstention_patterns=("no idea",)
    )
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compare", "--features", "x", "--gradient-sketch", "many"])
    assert "not a sketch size" in capsys.readouterr().err
    monkeypatch.setattr(offline_models, "load_model", lambda name, **kw: (make_tiny_model("llama"), tok))
    out_json = tmp_path / "report.json"
    argv = ["--features", str(tmp_path / "feats"), "--detectors", "confidence,length,probe", "--bootstrap", "5"]
    argv += ["--max-new-tokens", "2", "--json", str(out_json)]
    assert main(["compare", *argv]) == 0
    printed = capsys.readouterr().out
    assert "answer length (tokens)" in printed and "cost x" in printed
    report = json.loads(out_json.read_text())
    assert report["protocol"] == "paired" and "fused (stacked logistic regression)" in report["rows"]
    capped_json = tmp_path / "capped.json"
    capped = [*argv[:-1], str(capped_json), "--max-train", "4"]
    assert main(["compare", *capped]) == 0
    sizes = json.loads(capped_json.read_text())["sizes"]
    assert sizes["train"] == 4 and report["sizes"]["train"] > 4  # whole records: 2 pairs
    assert {k: sizes[k] for k in ("validation", "test")} == {k: report["sizes"][k] for k in ("validation", "test")}
    assert main(["compare", "--features", str(tmp_path / "nowhere")]) == 2


def test_generated_completion_replays_the_models_own_text() -> None:
    from hf_flowcheck.workflows.compare import generated_completion

    assert (
        generated_completion("\n\nThe answer is: England\n", "The answer is: England") == "\n\nThe answer is: England"
    )
    assert generated_completion(" Paris\nKnowledge: ...", "Paris") == " Paris"
    assert generated_completion(None, "Paris") == ""  # stores without raw text: the prompt's default spacing
    assert generated_completion(" Paris.", "London") == ""
    assert generated_completion("", "") == ""


def test_compare_times_only_timing_prompts_but_scales_to_the_test_split() -> None:
    model = make_tiny_model("llama")
    examples = _examples()
    common = dict(protocol="paired", n_bootstrap=5, fuse=False)
    some = compare_detectors(
        model,
        CharTokenizer(),
        examples,
        _split(examples),
        [AnswerLengthDetector()],
        timing=GenerationTiming(max_new_tokens=3, prompts=2),
        **common,
    )
    every = compare_detectors(
        model,
        CharTokenizer(),
        examples,
        _split(examples),
        [AnswerLengthDetector()],
        timing=GenerationTiming(max_new_tokens=3, prompts=None),
        **common,
    )
    assert some["generation"]["prompts"] == 2 and every["generation"]["prompts"] == 3  # 6 paired test rows = 3 prompts
    for rep in (some, every):  # per-sample denominator: seconds per prompt x 3 prompts / 6 rows
        gen = rep["generation"]
        assert gen["seconds_per_sample"] == pytest.approx(gen["seconds_per_prompt"] * 3 / 6)

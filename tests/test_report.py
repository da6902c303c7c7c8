"""HTML report and PNG heatmap from a tiny flow-checked generation."""

import dataclasses
import math
import re

import pytest
import torch
from conftest import make_tiny_model, tiny_validator

from hf_flowcheck import FlowCheckedModelForCausalLM
from hf_flowcheck.report import ReportItem, render_report, report_items_from_output, save_heatmap_png


def _html_tokenizer():
    """Word-level tokenizer whose every token holds characters HTML must escape."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<w{i}&>": i for i in range(99)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<w3&>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<w98&>", pad_token="<w0&>")


@pytest.fixture(scope="module")
def generated():
    model = make_tiny_model("llama")
    wrapped = FlowCheckedModelForCausalLM(model, tiny_validator(model))
    ids = torch.tensor([[0, 0, 5, 6, 7], [9, 8, 7, 6, 5]])
    att = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    out = wrapped.generate(
        input_ids=ids,
        attention_mask=att,
        max_new_tokens=6,
        do_sample=False,
        return_flow_scores=True,
        return_flow_features=True,
    )
    return out, _html_tokenizer()


def test_items_from_output(generated):
    out, tok = generated
    items = report_items_from_output(out, tok, prompts=["first <prompt>", "second & prompt"])
    assert len(items) == 2
    for i, item in enumerate(items):
        n_tok = int((out.flow_positions[i] >= 0).sum())
        assert len(item.tokens) == len(item.positions) == n_tok
        assert item.num_blocks == out.flow_event_scores.shape[1]
        assert item.culprit == tuple(out.flow_culprits[i].tolist())
        assert item.culprit_column() is not None
        assert math.isclose(item.score, float(out.flow_scores[i]), rel_tol=1e-6)
        assert len(item.feature_names) == len(out.flow_features.names)
        # Tokens are shaded by the risk the culprit is the riskiest of (flow_token_scores) ...
        torch.testing.assert_close(
            torch.tensor(item.token_scores()), out.flow_token_scores[i, :n_tok].float(), atol=1e-6, rtol=0
        )
        assert item.token_scores()[item.culprit_column()] == max(item.token_scores())
        # ... and a hand-built item without them by sigmoid(max over depth of the event logits).
        bare = dataclasses.replace(item, token_risks=None)
        ev = out.flow_event_scores[i][:, :n_tok].masked_fill(~out.flow_event_mask[i][:, :n_tok], float("-inf"))
        torch.testing.assert_close(
            torch.tensor(bare.token_scores()), torch.sigmoid(ev.max(0).values).float(), atol=1e-6, rtol=0
        )
        assert math.isclose(max(bare.token_scores()), item.score, rel_tol=1e-5)  # max pooling: the sample score
    with pytest.raises(ValueError, match="token_risks has 1 entries"):
        dataclasses.replace(items[0], token_risks=[0.5])
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        dataclasses.replace(items[0], token_risks=[2.0] * len(items[0].tokens))


def test_report_html_is_escaped_self_contained_and_marks_the_culprit(generated, tmp_path):
    out, tok = generated
    items = report_items_from_output(out, tok, prompts=["first <prompt>", "second & prompt"])
    items[0].refined = {
        "before_text": "<b>old</b>",
        "after_text": "new & better",
        "before_score": 0.9,
        "after_score": 0.2,
        "strategy": "flow",
        "culprit": items[0].culprit,
    }
    path = tmp_path / "report.html"
    text = render_report(items, path, subtitle="tiny <random> validator")
    assert path.read_text(encoding="utf-8") == text
    assert text.startswith("<!DOCTYPE html>")
    # Tokens (and prompts, refinement text, subtitle) appear escaped, never raw.
    for item in items:
        for t in set(item.tokens):
            assert t.startswith("<w")
            assert f">{t}<" not in text
            assert ">" + t.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") + "<" in text
    assert "first &lt;prompt&gt;" in text and "second &amp; prompt" in text
    assert "&lt;b&gt;old&lt;/b&gt;" in text and "<b>old</b>" not in text
    assert "tiny &lt;random&gt; validator" in text
    # The culprit is marked in the heatmap and in the answer.
    assert text.count('class="culprit-marker"') == 2
    assert 'id="culprit-0"' in text and 'id="culprit-1"' in text
    assert text.count('class="tok culprit"') == 2
    assert 'class="culprit-block"' in text  # feature curves mark the culprit block
    for name in out.flow_features.names:
        assert f'<div class="name">{name}</div>' in text
    # Self-contained: no network resources.
    assert "http://" not in text and "https://" not in text
    assert not re.search(r"""(src|href)\s*=\s*["']?(//|[a-z]+:)""", text, re.I)
    assert "<link" not in text and "@import" not in text
    # Depth × token cells: one rect per (block, token).
    n_cells = sum(item.num_blocks * len(item.tokens) for item in items)
    assert text.count('class="cell"') == n_cells


def test_heatmap_png_is_written(generated, tmp_path):
    pytest.importorskip("matplotlib")
    out, tok = generated
    item = report_items_from_output(out, tok)[1]
    path = save_heatmap_png(item, tmp_path / "sub" / "heat.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_report_item_without_events_and_features():
    item = ReportItem(prompt="p", tokens=[], positions=[], event_scores=[[], []], event_mask=[[], []], culprit=(-1, -1))
    assert item.culprit is None and item.culprit_column() is None
    text = render_report(item)
    assert "no scored tokens" in text and "return_flow_features=True" in text


def test_report_item_checks_shapes():
    with pytest.raises(ValueError, match="T = len"):
        ReportItem(prompt="p", tokens=["a", "b"], positions=[3, 4], event_scores=[[0.0]], event_mask=[[True]])
    with pytest.raises(ValueError, match="positions"):
        ReportItem(prompt="p", tokens=["a"], positions=[3, 4], event_scores=[[0.0]], event_mask=[[True]])
    with pytest.raises(TypeError, match="ReportItem"):
        render_report(["not an item"])


def test_report_from_a_refinement_result(generated):
    pytest.importorskip("hf_flowcheck.refinement")
    out, tok = generated
    model = make_tiny_model("llama")
    wrapped = FlowCheckedModelForCausalLM(model, tiny_validator(model))
    if not hasattr(wrapped, "refine"):
        pytest.skip("FlowCheckedModelForCausalLM.refine is not available")
    res = wrapped.refine(out, rows=[0, 1], n_cal=2)
    items = report_items_from_output(out, tok, refinements=res)
    text = render_report(items)
    for r in res.rows:
        refined = items[r.row].refined
        assert refined["strategy"] == "flow" and math.isclose(refined["before_score"], r.score_before)
        assert refined["after_text"] == tok.decode(r.refined_answer_ids, skip_special_tokens=True)
    for row, reason in res.skipped.items():
        assert reason in items[row].refined["note"]
    assert text.count("<h3>Refinement</h3>") == 2

"""The flow validator's model card (markdown, generated offline from its config and training metadata)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from hf_flowcheck.detectors.checkpoint import card_front_matter
from hf_flowcheck.version import __version__

__all__ = ["architecture_text", "model_card_text"]


def _looks_like_hub_id(name: str | None) -> bool:
    if not name or name.startswith((".", "/", "~")) or "\\" in name or os.path.isabs(name):
        return False
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(parts)


def model_card_text(validator: Any, repo_id: str | None = None) -> str:
    """Markdown of the model card (works offline)."""
    from hf_flowcheck.metrics import format_table

    fp = validator.base_fingerprint or {}
    base_id = fp.get("base_id")
    meta = validator.training_metadata
    tags = ["hf_flowcheck", "hallucination-detection", "flow-signatures", "pytorch_model_hub_mixin"]
    lines = card_front_matter(tags, base_model=base_id if _looks_like_hub_id(base_id) else None)
    title = f"Flow validator for {base_id}" if base_id else "Flow validator"
    lines += [
        f"# {title}",
        "",
        "A hallucination detector built with hf_flowcheck (`pip install hf-flowcheck`) from "
        "*flow signatures*: how the base model's residual stream moves between blocks, read through its "
        "own readout. `score` = `sigmoid(logit)` lies in [0, 1]; **higher = more likely hallucinated**. "
        "The culprit event (the arg-max per-event logit) names the token and block to refine.",
        "",
    ]
    styles, tasks = meta.get("prompt_styles"), meta.get("tasks")
    if styles or tasks:
        lines += ["## Trained on", ""]
        if styles:
            lines.append("Prompt styles: " + ", ".join(f"`{x}`" for x in styles) + ".")
        if tasks:
            lines.append("Tasks: " + ", ".join(f"`{x}`" for x in tasks) + ".")
        lines.append("")
    for section in meta.get("card_sections") or []:  # written by the training script, already markdown
        lines += [f"## {section['title']}", "", section["text"].rstrip(), ""]
    lines += ["## Base model", ""]
    if fp:
        lines += ["| field | value |", "|---|---|"] + [f"| {k} | `{v}` |" for k, v in fp.items()]
    else:
        lines.append("Not recorded (the validator carries no base-model fingerprint).")
    lines += ["", "## Features", ""]
    if validator.flow_config is not None:
        fc = dataclasses.asdict(validator.flow_config)
        lines.append("`FlowConfig(" + ", ".join(f"{k}={v!r}" for k, v in fc.items()) + ")`")
    else:
        lines.append("FlowConfig not recorded.")
    names = ", ".join(f"`{n}`" for n in validator.config.feature_names) or "(unnamed)"
    lines += [
        "",
        f"{validator.config.num_features} channels: {names}.",
        "",
        "## Architecture",
        "",
        architecture_text(validator),
        "",
        "## Evaluation",
        "",
    ]
    evaluation = meta.get("evaluation")
    if evaluation:
        lines += ["```text", format_table(evaluation), "```", ""]
        lines.append("Each cell is `value [low, high]`, a 95% percentile bootstrap interval. Label 1 = hallucinated.")
    else:
        lines.append("No evaluation recorded.")
    for key in ("protocol", "dataset", "split"):
        if key in meta:
            lines.append(f"- {key}: `{meta[key]}`")
    for later in meta.get("later_evaluations") or []:
        lines += ["", f"### {later['title']}", ""]
        if later.get("note"):
            lines += [later["note"], ""]
        lines += ["```text", format_table(later["evaluation"]), "```", "", "```bash", later["command"], "```"]
    cal = meta.get("calibration") or {}
    if cal:
        lines += ["", "## Calibration", ""]
        if "skipped" in cal:
            lines.append(f"None: {cal['skipped']}.")
        else:
            lines.append(
                f"Platt scaling on the {cal['chosen_on']} split ({cal['n']} answers, "
                f"{cal['hallucinated_share']:.0%} hallucinated): `score = sigmoid({cal['scale']:.3f} * logit "
                f"{cal['bias']:+.3f})`; expected calibration error {cal['ece_before']:.3f} before, "
                f"{cal['ece_after']:.3f} after. A score is the hallucination rate of answers like these; "
                "another mix of prompts or another base rate moves it (the ranking does not change)."
            )
    points = meta.get("operating_points") or {}
    rows = [(k, v) for k, v in points.items() if isinstance(v, dict)]
    if rows:
        lines += ["", "## Operating points (chosen on the validation split)", ""]
        lines += ["| operating point | threshold | validation figures |", "|---|---|---|"]
        for k, v in rows:
            figures = ", ".join(f"{n} {x:.3f}" for n, x in v.items() if n != "threshold")
            lines.append(f"| `{k}` | {v['threshold']:.4f} | {figures} |")
        missing = [k for k, v in points.items() if v is None]
        if missing:
            lines.append(f"\nNo threshold reaches {', '.join(f'`{k}`' for k in missing)} on validation.")
        lines.append(
            '\n`generate(..., flow_check_every=1, flow_abstain_threshold="recommended")` uses `precision_0.8`.'
        )
    by_group = meta.get("operating_points_by_group") or {}
    if by_group:
        lines += ["", "Chosen on the validation answers of each prompt style "
                  "(`validator.recommended_threshold(point, prompt_style=...)`):", ""]  # fmt: skip
        names = sorted({k for g in by_group.values() for k, v in g.items() if k != "n"})
        lines += ["| prompt style | answers | " + " | ".join(f"`{k}`" for k in names) + " |"]
        lines += ["|---|---|" + "---|" * len(names)]
        for g, pts in by_group.items():
            cells = [f"{pts[k]['threshold']:.3f}" if pts.get(k) else "none" for k in names]
            lines.append(f"| {g} | {pts['n']} | " + " | ".join(cells) + " |")
    lines += ["", "## Training", ""]
    hist = meta.get("history") or {}
    hyper = meta.get("hyperparameters") or {}
    if hyper:
        lines.append("Hyperparameters: " + ", ".join(f"`{k}={v}`" for k, v in hyper.items()) + ".")
    if hist:
        lines.append(
            f"Checkpoint chosen on the validation split ({hist.get('selection', 'val_auroc')}): epoch "
            f"{hist.get('best_epoch')}, validation loss {hist.get('best_val_loss')}, validation AUROC "
            f"{hist.get('best_val_auroc')}; {hist.get('epochs_run')} epochs run "
            f"({'early-stopped' if hist.get('stopped_early') else 'no early stop'})."
        )
    if not hyper and not hist:
        lines.append("Not recorded.")
    lines += ["", "## Reproduce", ""]
    cmd = meta.get("command")
    lines += ["```bash", cmd, "```"] if cmd else ["The producing command was not recorded."]
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "from hf_flowcheck import FlowExtractor, FlowConfig",
        "from hf_flowcheck.detectors import FlowValidator",
        "",
        f"validator = FlowValidator.from_pretrained({json.dumps(repo_id or '<this repo>')}, base_model=model)",
        "extractor = FlowExtractor(model, validator.flow_config)",
        "out = validator.score_features(extractor.extract(input_ids, attention_mask, response_mask))",
        "out.scores  # [N], higher = more likely hallucinated",
        "```",
        "",
        f"Written by hf_flowcheck {__version__} (format version {validator.FORMAT_VERSION}).",
        "",
    ]
    return "\n".join(lines)


#: What the state branch reads, by ``FlowConfig.state_summary`` (``{blocks}``: its ``state_blocks``).
STATE_INPUT_TEXT = {
    "last": "the residual at the last answer token entering block(s) {blocks}",
    "mean": "the residual entering block(s) {blocks} averaged over the answer's content tokens",
    "token_confidence": "the answer's token confidence (-mean log p, -min log p, mean entropy over its content tokens)",
}


def architecture_text(validator: Any, state_summary: str | None = None) -> str:
    c = validator.config
    if state_summary is None:
        fc = getattr(validator, "flow_config", None)
        state_summary = fc.state_summary if fc is not None and fc.state_summary != "none" else "last"
    if validator.members is not None:
        return (
            f"An ensemble of {c.members} validators of the same shape, initialised independently and trained "
            "together on their mean logit; the answer's, events' and tokens' logits are the members' means, and "
            "the culprit is the event with the largest mean logit. Each member: "
            + architecture_text(validator.members[0], state_summary)
        )
    scaling = {
        "block_log_standardize": "signed log, then per-(block, feature) standardisation (train split)",
        "log_standardize": "signed log, then per-feature standardisation (train split)",
        "standardize": "per-feature standardisation (train split)",
        "none": "raw features",
    }[c.input_transform]
    parts = [scaling]
    if c.event_layernorm:
        parts.append(f"LayerNorm({c.num_features})")
    depth = f" + block embedding ({c.block_embedding})" if c.block_embedding else ""
    parts.append(f"MLP ({c.num_features}{depth}→{c.hidden}→{c.embed}, GELU, dropout {c.dropout}) → LayerNorm")
    if c.head == "gru":
        parts.append(
            f"GRU ({c.embed}→{c.gru_hidden}) over the events in depth-major order → Linear({c.gru_hidden}→1) per "
            f"event → `{c.pooling}` pooling"
        )
    elif c.head == "depth":
        parts.append(
            f"per event a logit Linear({c.embed}→1); per block the mean and max over tokens of the event "
            f"embeddings and the largest event logit → Conv1d over depth ({2 * c.embed + 1}→{c.embed}, kernel 3, "
            f"GELU) → Linear({c.embed}→1) per block; the sample logit is the mean block logit"
        )
    else:
        parts.append(
            f"per event: a logit Linear({c.embed}→1) and an attention score Linear({c.embed}→1); the sample "
            "logit is the attention-weighted mean of the event logits"
        )
    text = " → ".join(parts) + "."
    if c.state_dim:
        text += (
            " Plus a state branch: "
            + STATE_INPUT_TEXT[state_summary].format(blocks=list(c.state_blocks))
            + f" (d = {c.state_dim}), standardised, → dropout → Linear → added to the sample logit. Trained on "
            "complete answers: it scores finished answers. Running scores of a streaming check (which read an "
            "answer cut mid-way) are outside what it was trained on; stream with a flow-only validator trained "
            "on answer prefixes."
        )
    return text

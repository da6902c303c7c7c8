"""Self-contained HTML reports (and a PNG heatmap) of flow-checked generations.

A report shows, for each generation: the answer with every scored token shaded by its risk (the
validator's ``flow_token_scores``, the quantity the culprit is the riskiest of; items built by hand
without them fall back to the sigmoid of the token's largest event logit over depth), the depth × token
heatmap of event scores with the culprit event marked, the ten flow features over depth for the
culprit token (when the generation returned its features), and a refinement's before/after.

The page is one HTML file with inline CSS, SVG and a few lines of JavaScript; it loads nothing
from the network, so it can be opened offline, attached to an issue or archived.

This module is the last stage of the data flow (it only reads outputs) and imports no other
hf_flowcheck stage at module level.

Example:
    >>> import torch
    >>> item = ReportItem(
    ...     prompt="Q: 2+2?", tokens=[" 4", "."], positions=[5, 6],
    ...     event_scores=torch.tensor([[0.1, -2.0], [1.5, 0.0]]),
    ...     event_mask=torch.ones(2, 2, dtype=torch.bool), culprit=(5, 1), score=0.82)
    >>> html = render_report([item])
    >>> "<svg" in html and "culprit" in html
    True
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ReportItem", "render_report", "report_items_from_output", "save_heatmap_png"]


# ---------------------------------------------------------------------------------------------
# The data of one report section
# ---------------------------------------------------------------------------------------------


def _to_list(x: Any) -> Any:
    """Tensor / ndarray / nested sequence → nested Python lists."""
    if x is None:
        return None
    if hasattr(x, "detach"):
        x = x.detach().float().cpu() if x.dtype.is_floating_point else x.detach().cpu()
    if hasattr(x, "tolist"):
        return x.tolist()
    return [_to_list(v) if isinstance(v, (list, tuple)) or hasattr(v, "tolist") else v for v in x]


def _sigmoid(x: float) -> float:
    if x != x:  # nan
        return float("nan")
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


@dataclass
class ReportItem:
    """One generation to report.

    Attributes:
        prompt: The prompt text.
        tokens: ``T`` decoded tokens, one per scored column (``event_scores[:, t]``).
        positions: ``T`` sequence indices of those tokens.
        event_scores: ``[B, T]`` validator event logits (``-inf`` / anything where ``event_mask`` is false).
        event_mask: ``[B, T]`` bool, true for real events.
        culprit: ``(position t0, block b0)`` of the culprit event, or ``None`` / ``(-1, -1)`` without events.
        score: Sample score in ``[0, 1]`` (higher = more likely hallucinated); ``nan`` without events.
        features: ``[B, T, F]`` flow features, or ``None`` when the generation did not return them.
        feature_names: The ``F`` feature names.
        refined: Optional refinement: a mapping with ``before_text``, ``after_text``, ``before_score``,
            ``after_score`` and optionally ``strategy``, ``culprit`` (``(t0, b0)``), ``note``.
        answer: The full decoded answer (defaults to the tokens joined).
        title: Section title (defaults to ``"Generation i"``).
        abstained: Whether a streaming check stopped this row.
        token_risks: ``[T]`` each token's risk in ``[0, 1]`` (``FlowGenerateOutput.flow_token_scores``,
            ``nan`` for a token without events), or ``None`` to shade by the largest event instead.
    """

    prompt: str
    tokens: list[str]
    positions: list[int]
    event_scores: Any
    event_mask: Any
    culprit: tuple[int, int] | None = None
    score: float = float("nan")
    features: Any = None
    feature_names: Sequence[str] = ()
    refined: Mapping[str, Any] | None = None
    answer: str | None = None
    title: str | None = None
    abstained: bool = False
    token_risks: Any = None
    _probs: list[list[float]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self.tokens = [str(t) for t in self.tokens]
        self.positions = [int(p) for p in _to_list(self.positions)]
        ev = _to_list(self.event_scores)
        mask = _to_list(self.event_mask)
        n_tok = len(self.tokens)
        if len(self.positions) != n_tok:
            raise ValueError(f"tokens has {n_tok} entries but positions has {len(self.positions)}; give one each.")
        if ev is None or mask is None:
            raise ValueError("event_scores and event_mask are required ([B, T] each).")
        if len(ev) != len(mask) or any(len(r) != n_tok for r in ev) or any(len(r) != n_tok for r in mask):
            shape = (len(ev), len(ev[0]) if ev else 0)
            raise ValueError(f"event_scores {shape} and event_mask must both be [B, T] with T = len(tokens) = {n_tok}.")
        self.event_scores = [[float(v) for v in row] for row in ev]
        self.event_mask = [[bool(v) for v in row] for row in mask]
        self._probs = [
            [_sigmoid(v) if m and v > float("-inf") else float("nan") for v, m in zip(r, mr)]
            for r, mr in zip(self.event_scores, self.event_mask)
        ]
        if self.culprit is not None:
            c = [int(v) for v in _to_list(self.culprit)]
            self.culprit = None if len(c) != 2 or c[0] < 0 or c[1] < 0 else (c[0], c[1])
        self.score = float(self.score) if self.score is not None else float("nan")
        if self.token_risks is not None:
            risks = [float(v) for v in _to_list(self.token_risks)]
            if len(risks) != n_tok:
                raise ValueError(f"token_risks has {len(risks)} entries for {n_tok} tokens; give one per token.")
            if any(not 0.0 <= v <= 1.0 for v in risks if v == v):
                raise ValueError("token_risks must lie in [0, 1] (flow_token_scores; nan for a token without events).")
            self.token_risks = risks
        if self.features is not None:
            feats = _to_list(self.features)
            if len(feats) != self.num_blocks or any(len(r) != n_tok for r in feats):
                raise ValueError(f"features must be [B, T, F] = [{self.num_blocks}, {n_tok}, F].")
            self.features = feats
            n_f = len(feats[0][0]) if feats and feats[0] else len(self.feature_names)
            if not self.feature_names:
                self.feature_names = tuple(f"feature {i}" for i in range(n_f))
            elif len(self.feature_names) != n_f:
                raise ValueError(f"feature_names has {len(self.feature_names)} names for {n_f} features.")
        self.feature_names = tuple(self.feature_names)
        if self.answer is None:
            self.answer = "".join(self.tokens)

    @property
    def num_blocks(self) -> int:
        return len(self.event_scores)

    @property
    def event_probs(self) -> list[list[float]]:
        """``[B, T]`` ``sigmoid`` of the event logits, ``nan`` where not valid."""
        return self._probs

    def token_scores(self) -> list[float]:
        """``[T]`` per-token score: :attr:`token_risks` when given, else ``sigmoid`` of the maximum event
        logit over depth (``nan`` if none)."""
        if self.token_risks is not None:
            return list(self.token_risks)
        out = []
        for t in range(len(self.tokens)):
            vals = [self.event_scores[b][t] for b in range(self.num_blocks) if self.event_mask[b][t]]
            vals = [v for v in vals if v == v and v > float("-inf")]
            out.append(_sigmoid(max(vals)) if vals else float("nan"))
        return out

    def culprit_column(self) -> int | None:
        """Index into ``tokens`` of the culprit token, or ``None``."""
        if self.culprit is None:
            return None
        try:
            return self.positions.index(self.culprit[0])
        except ValueError:
            return None


def _refined_dict(obj: Any, tokenizer: Any = None) -> dict[str, Any] | None:
    """A refinement of one row → the ``ReportItem.refined`` mapping.

    Takes a mapping (returned as is), a :class:`~hf_flowcheck.refinement.RefinedRow` (its token ids
    are decoded with ``tokenizer``), or any object with ``before_text``/``after_text``-style attributes.
    """
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return dict(obj)
    if hasattr(obj, "refined_answer_ids") and tokenizer is not None:  # hf_flowcheck.refinement.RefinedRow
        notes = []
        if getattr(obj, "patched_block", None) is not None:
            notes.append(
                f"clamp on block {obj.patched_block}: λ < 1 at {obj.positions_clamped} of "
                f"{obj.positions_patched} patched positions (mean λ {_fmt(obj.mean_lambda)}, "
                f"s_ref {_fmt(obj.s_ref)})"
            )
        if getattr(obj, "cost_ratio", None) is not None:
            notes.append(f"cost ratio {_fmt(obj.cost_ratio, 2)}")
        if getattr(obj, "note", None):
            notes.append(str(obj.note))
        return {
            "before_text": tokenizer.decode(obj.original_answer_ids, skip_special_tokens=True),
            "after_text": tokenizer.decode(obj.refined_answer_ids, skip_special_tokens=True),
            "before_score": obj.score_before,
            "after_score": obj.score_after,
            "strategy": obj.strategy,
            "culprit": obj.culprit_before,
            "note": " · ".join(notes) or None,
        }
    keys = {
        "before_text": ("before_text", "original_text"),
        "after_text": ("after_text", "refined_text"),
        "before_score": ("before_score", "score_before", "original_score"),
        "after_score": ("after_score", "score_after", "refined_score"),
        "strategy": ("strategy",),
        "culprit": ("culprit", "culprit_before"),
        "note": ("note",),
    }
    out: dict[str, Any] = {}
    for key, names in keys.items():
        for name in names:
            value = getattr(obj, name, None)
            if value is not None:
                out[key] = value
                break
    return out or None


def _refinements_by_row(refinements: Any, batch: int) -> dict[int, Any]:
    """Row → refinement, from a ``FlowRefineOutput`` (``.rows`` with ``.row``), a list, or one object."""
    if refinements is None:
        return {}
    rows = getattr(refinements, "rows", None)
    if isinstance(rows, (list, tuple)) and all(hasattr(r, "row") for r in rows):
        out: dict[int, Any] = {r.row: r for r in rows}
        for row, reason in (getattr(refinements, "skipped", None) or {}).items():
            out.setdefault(int(row), {"note": f"not refined: {reason}"})
        return out
    if isinstance(refinements, (list, tuple)):
        return {i: r for i, r in enumerate(refinements) if r is not None and i < batch}
    return {0: refinements}


def report_items_from_output(
    output: Any,
    tokenizer: Any,
    prompts: Sequence[str] | None = None,
    refinements: Any = None,
) -> list[ReportItem]:
    """Build one :class:`ReportItem` per row of a :class:`~hf_flowcheck.FlowGenerateOutput`.

    Args:
        output: From ``generate(..., return_flow_scores=True)`` (``return_flow_features=True`` adds
            the feature curves).
        tokenizer: Anything with ``decode(ids, skip_special_tokens=...)``.
        prompts: The prompt texts (default: the decoded prompt columns of ``output.sequences``).
        refinements: Optional: the :class:`~hf_flowcheck.refinement.FlowRefineOutput` of
            ``model.refine(output)`` (rows it refined get a before/after panel, skipped rows a note),
            or a list with one mapping per row (see :attr:`ReportItem.refined`), or one mapping for row 0.

    Returns:
        ``batch`` report items.
    """
    if getattr(output, "flow_event_scores", None) is None:
        raise ValueError("The output has no flow scores; call generate(..., return_flow_scores=True) with a validator.")
    seqs = output.sequences.detach().cpu()
    plen = int(output.prompt_length if output.prompt_length is not None else 0)
    ev = output.flow_event_scores.detach().float().cpu()
    mask = output.flow_event_mask.detach().cpu()
    pos = output.flow_positions.detach().cpu()
    culprits = output.flow_culprits.detach().cpu()
    scores = output.flow_scores.detach().float().cpu()
    feats = output.flow_features
    risks = getattr(output, "flow_token_scores", None)
    risks = None if risks is None else risks.detach().float().cpu()
    abstained = getattr(output, "flow_abstained", None)
    by_row = _refinements_by_row(refinements, seqs.shape[0])
    items = []
    for i in range(seqs.shape[0]):
        keep = pos[i] >= 0
        cols = keep.nonzero().flatten()
        positions = pos[i, cols].tolist()
        tokens = [tokenizer.decode([int(seqs[i, p])], skip_special_tokens=False) for p in positions]
        prompt = prompts[i] if prompts is not None else tokenizer.decode(seqs[i, :plen], skip_special_tokens=True)
        answer = tokenizer.decode(seqs[i, plen:], skip_special_tokens=True)
        values, names = None, ()
        if feats is not None:
            values = feats.values[i][:, cols].detach().float().cpu()
            names = tuple(feats.names)
        items.append(
            ReportItem(
                prompt=prompt,
                tokens=tokens,
                positions=positions,
                event_scores=ev[i][:, cols],
                event_mask=mask[i][:, cols],
                culprit=tuple(culprits[i].tolist()),
                score=float(scores[i]),
                features=values,
                feature_names=names,
                refined=_refined_dict(by_row.get(i), tokenizer),
                answer=answer,
                abstained=bool(abstained[i]) if abstained is not None else False,
                token_risks=None if risks is None else risks[i, cols],
            )
        )
    return items


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------

# A sequential colour scale, light yellow → red → dark purple (magma-like, 5 stops).
_STOPS = [(252, 253, 191), (254, 176, 120), (241, 96, 93), (183, 55, 121), (81, 18, 124)]


def _color(p: float) -> str:
    if p != p:
        return "#e8e8e8"
    p = min(max(p, 0.0), 1.0) * (len(_STOPS) - 1)
    i = min(int(p), len(_STOPS) - 2)
    f = p - i
    c = [round(a + (b - a) * f) for a, b in zip(_STOPS[i], _STOPS[i + 1])]
    return "#{:02x}{:02x}{:02x}".format(*c)


def _text_color(p: float) -> str:
    return "#ffffff" if p == p and p > 0.55 else "#111111"


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(x: Any, digits: int = 3) -> str:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return _esc(x)
    return "n/a" if x != x else f"{x:.{digits}f}"


def _visible(token: str) -> str:
    """A token with its whitespace made visible for labels."""
    return token.replace("\n", "↵").replace("\t", "⇥").replace(" ", "·") or "∅"


_CSS = """
:root { --fg:#1b1b1f; --muted:#5f6368; --line:#d0d4da; --bg:#ffffff; --card:#f7f8fa; --accent:#0b57d0; }
* { box-sizing: border-box; }
body { font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: var(--bg); margin: 0; padding: 24px 32px 48px; max-width: 1320px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 0 0 8px; }
h3 { font-size: 14px; margin: 18px 0 6px; text-transform: uppercase; letter-spacing: .04em; color: var(--muted); }
.sub { color: var(--muted); margin: 0 0 18px; }
section.gen { border: 1px solid var(--line); border-radius: 10px; padding: 18px 20px; margin: 18px 0;
              background: var(--bg); }
.meta { display: flex; gap: 18px; flex-wrap: wrap; margin-bottom: 8px; }
.badge { display: inline-block; padding: 2px 10px; border-radius: 999px; font-weight: 600;
         border: 1px solid var(--line); }
.prompt { white-space: pre-wrap; background: var(--card); border-radius: 6px; padding: 8px 10px;
          font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px;
          max-height: 160px; overflow: auto; }
.answer { font-size: 16px; line-height: 2.0; white-space: pre-wrap; }
.tok { border-radius: 3px; padding: 2px 1px; cursor: default; }
.tok.culprit { outline: 2.5px solid #0b57d0; outline-offset: 1px; }
.tok.hl, .tok:hover { box-shadow: 0 0 0 2px #1b1b1f; }
.legend { display: flex; align-items: center; gap: 8px; color: var(--muted); font-size: 12px; margin: 6px 0; }
.legend .bar { width: 180px; height: 10px; border-radius: 3px; border: 1px solid var(--line); }
.scroll { overflow-x: auto; }
svg text { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
svg .cell:hover { stroke: #1b1b1f; stroke-width: 1.5; }
svg .col-hl { stroke: #1b1b1f; stroke-width: 1.5; }
.curves { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 10px; }
.curve { background: var(--card); border-radius: 6px; padding: 6px 8px; }
.curve .name { font-weight: 600; font-size: 12.5px; }
.curve-svg { width: 100%; height: auto; }
.refine { display: grid; grid-template-columns: 1fr 1fr; gap: 14px; }
.refine > div { background: var(--card); border-radius: 6px; padding: 10px 12px; }
.refine .txt { white-space: pre-wrap; font-size: 15px; }
.note { color: var(--muted); font-size: 12.5px; }
table.summary { border-collapse: collapse; margin: 8px 0 4px; }
table.summary td, table.summary th { border-bottom: 1px solid var(--line); padding: 4px 12px; text-align: left; }
#flowcheck-errors:empty { display: none; }
#flowcheck-errors { color: #b3261e; white-space: pre-wrap; border: 1px solid #b3261e; padding: 8px; }
"""

# Records script errors into the page (#flowcheck-errors), so a headless browser's --dump-dom shows
# them, and links each answer token with its heatmap column on hover.
_JS = """
(function () {
  var sink = document.getElementById('flowcheck-errors');
  function record(msg) { if (sink) { sink.textContent += msg + '\\n'; } }
  window.addEventListener('error', function (e) { record('Uncaught ' + (e.message || e)); });
  window.addEventListener('unhandledrejection', function (e) { record('Unhandled rejection ' + e.reason); });
  try {
    var toks = document.querySelectorAll('.tok[data-col]');
    for (var i = 0; i < toks.length; i++) {
      (function (tok) {
        var sec = tok.getAttribute('data-sec'), col = tok.getAttribute('data-col');
        var sel = '.cell[data-sec="' + sec + '"][data-col="' + col + '"]';
        tok.addEventListener('mouseenter', function () {
          var cells = document.querySelectorAll(sel);
          for (var j = 0; j < cells.length; j++) { cells[j].classList.add('col-hl'); }
        });
        tok.addEventListener('mouseleave', function () {
          var cells = document.querySelectorAll(sel);
          for (var j = 0; j < cells.length; j++) { cells[j].classList.remove('col-hl'); }
        });
      })(toks[i]);
    }
    document.body.setAttribute('data-flowcheck-ready', '1');
  } catch (err) { record('Uncaught ' + err); }
})();
"""


def _legend() -> str:
    stops = ", ".join(f"{_color(i / 10)} {i * 10}%" for i in range(11))
    return (
        '<div class="legend"><span>0</span>'
        f'<span class="bar" style="background: linear-gradient(90deg, {stops});"></span>'
        "<span>1</span><span>token risk, or event score = sigmoid(event logit); higher = more likely "
        "hallucinated · grey = no event</span></div>"
    )


def _answer_html(item: ReportItem, sec: int) -> str:
    scores = item.token_scores()
    ccol = item.culprit_column()
    parts = []
    for t, (tok, s) in enumerate(zip(item.tokens, scores)):
        cls = "tok culprit" if t == ccol else "tok"
        tip = f"position {item.positions[t]} · token {'risk' if item.token_risks is not None else 'score'} {_fmt(s)}"
        if t == ccol and item.culprit is not None:
            tip += f" · culprit (block {item.culprit[1]})"
        text = tok.replace("\n", "↵\n")
        parts.append(
            f'<span class="{cls}" data-sec="{sec}" data-col="{t}" title="{_esc(tip)}" '
            f'style="background:{_color(s)};color:{_text_color(s)}">{_esc(text)}</span>'
        )
    if not parts:
        return '<div class="note">(no scored tokens: the answer was empty or only special tokens)</div>'
    return '<div class="answer">' + "".join(parts) + "</div>"


def _heatmap_svg(item: ReportItem, sec: int) -> str:
    n_b, n_t = item.num_blocks, len(item.tokens)
    if n_t == 0 or n_b == 0:
        return '<div class="note">(no events)</div>'
    cw = max(10.0, min(34.0, 1100.0 / n_t))
    ch = max(10.0, min(22.0, 420.0 / n_b))
    left, top = 56.0, 12.0
    label_h = 86.0 if cw >= 11 else 20.0
    width = left + n_t * cw + 16
    height = top + n_b * ch + label_h + 8
    out = [
        f'<svg class="heatmap" role="img" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" aria-label="depth by token event scores">'
    ]
    probs = item.event_probs
    for b in range(n_b):
        y = top + b * ch
        if n_b <= 40 or b % max(1, n_b // 20) == 0:
            out.append(
                f'<text x="{left - 6:.1f}" y="{y + ch * 0.72:.1f}" text-anchor="end" font-size="10" '
                f'fill="#5f6368">{b}</text>'
            )
        for t in range(n_t):
            p = probs[b][t]
            logit = item.event_scores[b][t]
            tip = f"block {b} · token {_visible(item.tokens[t])} (position {item.positions[t]})"
            tip += " · no event" if p != p else f" · score {p:.3f} (logit {logit:.2f})"
            out.append(
                f'<rect class="cell" data-sec="{sec}" data-col="{t}" x="{left + t * cw:.1f}" y="{y:.1f}" '
                f'width="{cw:.1f}" height="{ch:.1f}" fill="{_color(p)}"><title>{_esc(tip)}</title></rect>'
            )
    # Token labels, rotated, under the grid.
    step = 1 if cw >= 11 else max(1, math.ceil(11 / cw))
    for t in range(0, n_t, step):
        x = left + (t + 0.5) * cw
        y = top + n_b * ch + 6
        label = _visible(item.tokens[t])
        label = label if len(label) <= 14 else label[:13] + "…"
        if cw >= 11:
            out.append(
                f'<text x="{x:.1f}" y="{y:.1f}" font-size="10.5" text-anchor="end" '
                f'transform="rotate(-60 {x:.1f} {y:.1f})" dy="0.7em">{_esc(label)}</text>'
            )
    out.append(
        f'<text x="12" y="{top + n_b * ch / 2:.1f}" font-size="11" fill="#5f6368" text-anchor="middle" '
        f'transform="rotate(-90 12 {top + n_b * ch / 2:.1f})">block (depth ↓)</text>'
    )
    ccol = item.culprit_column()
    if ccol is not None and item.culprit is not None and 0 <= item.culprit[1] < n_b:
        x = left + ccol * cw
        y = top + item.culprit[1] * ch
        tip = f"culprit: block {item.culprit[1]}, position {item.culprit[0]}"
        out.append(
            f'<g class="culprit-marker" id="culprit-{sec}"><title>{_esc(tip)}</title>'
            f'<rect x="{x - 1.5:.1f}" y="{y - 1.5:.1f}" width="{cw + 3:.1f}" height="{ch + 3:.1f}" fill="none" '
            f'stroke="#0b57d0" stroke-width="3"/>'
            f'<path d="M{x + 3:.1f},{y + 3:.1f} L{x + cw - 3:.1f},{y + ch - 3:.1f} M{x + cw - 3:.1f},{y + 3:.1f} '
            f'L{x + 3:.1f},{y + ch - 3:.1f}" stroke="#0b57d0" stroke-width="2"/></g>'
        )
    out.append("</svg>")
    return '<div class="scroll">' + "".join(out) + "</div>"


def _median(vals: list[float]) -> float:
    vals = sorted(v for v in vals if v == v)
    if not vals:
        return float("nan")
    n = len(vals)
    return vals[n // 2] if n % 2 else 0.5 * (vals[n // 2 - 1] + vals[n // 2])


def _curve_svg(ys: list[float], ref: list[float], mark: int | None) -> str:
    w, h, l, r, t, b = 250.0, 120.0, 40.0, 8.0, 8.0, 22.0
    finite = [v for v in ys + ref if v == v and abs(v) != float("inf")]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    n = len(ys)

    def px(i: int) -> float:
        return l + (w - l - r) * (i / max(1, n - 1))

    def py(v: float) -> float:
        return t + (h - t - b) * (1 - (v - lo) / (hi - lo))

    def path(vals: list[float]) -> str:
        pts, pen = [], "M"
        for i, v in enumerate(vals):
            if v != v or abs(v) == float("inf"):
                pen = "M"
                continue
            pts.append(f"{pen}{px(i):.1f},{py(v):.1f}")
            pen = "L"
        return " ".join(pts)

    out = [f'<svg class="curve-svg" width="{w:.0f}" height="{h:.0f}" viewBox="0 0 {w:.0f} {h:.0f}">']
    out.append(f'<line x1="{l}" y1="{h - b}" x2="{w - r}" y2="{h - b}" stroke="#c4c7cc"/>')
    out.append(f'<line x1="{l}" y1="{t}" x2="{l}" y2="{h - b}" stroke="#c4c7cc"/>')
    for v in (lo, hi):
        out.append(
            f'<text x="{l - 4}" y="{py(v) + 3:.1f}" font-size="9" text-anchor="end" fill="#5f6368">{v:.3g}</text>'
        )
    for i in sorted({0, n - 1}):
        out.append(
            f'<text x="{px(i):.1f}" y="{h - b + 12}" font-size="9" text-anchor="middle" fill="#5f6368">{i}</text>'
        )
    out.append(
        f'<text x="{(l + w - r) / 2:.1f}" y="{h - 2}" font-size="9" text-anchor="middle" fill="#5f6368">block</text>'
    )
    if mark is not None and 0 <= mark < n:
        out.append(
            f'<line class="culprit-block" x1="{px(mark):.1f}" y1="{t}" x2="{px(mark):.1f}" y2="{h - b}" '
            f'stroke="#0b57d0" stroke-dasharray="3,2"/>'
        )
    if ref:
        out.append(f'<path d="{path(ref)}" fill="none" stroke="#9aa0a6" stroke-width="1.3" stroke-dasharray="4,3"/>')
    out.append(f'<path d="{path(ys)}" fill="none" stroke="#c5221f" stroke-width="1.8"/>')
    for i, v in enumerate(ys):
        if v == v and abs(v) != float("inf"):
            out.append(
                f'<circle cx="{px(i):.1f}" cy="{py(v):.1f}" r="1.8" fill="#c5221f">'
                f"<title>block {i}: {v:.4g}</title></circle>"
            )
    out.append("</svg>")
    return "".join(out)


def _curves_html(item: ReportItem) -> str:
    ccol = item.culprit_column()
    if item.features is None:
        return (
            '<div class="note">Feature curves need the features: generate with '
            "<code>return_flow_features=True</code>.</div>"
        )
    if ccol is None:
        return '<div class="note">(no culprit event)</div>'
    n_b = item.num_blocks
    blocks = []
    for f, name in enumerate(item.feature_names):
        ys = [item.features[b][ccol][f] if item.event_mask[b][ccol] else float("nan") for b in range(n_b)]
        ref = []
        for b in range(n_b):
            others = [item.features[b][t][f] for t in range(len(item.tokens)) if t != ccol and item.event_mask[b][t]]
            ref.append(_median(others))
        mark = item.culprit[1] if item.culprit is not None else None
        blocks.append(f'<div class="curve"><div class="name">{_esc(name)}</div>{_curve_svg(ys, ref, mark)}</div>')
    head = (
        f'<div class="note">Token {_esc(repr(item.tokens[ccol]))} (position {item.positions[ccol]}): '
        '<span style="color:#c5221f">━ culprit token</span> · '
        '<span style="color:#9aa0a6">╌ median of the other answer tokens</span> · '
        '<span style="color:#0b57d0">┆ culprit block</span></div>'
    )
    return head + '<div class="curves">' + "".join(blocks) + "</div>"


def _refine_html(refined: Mapping[str, Any]) -> str:
    strategy = refined.get("strategy")
    culprit = refined.get("culprit")
    head = []
    if strategy is not None:
        head.append(f"strategy <b>{_esc(strategy)}</b>")
    if culprit is not None:
        c = _to_list(culprit)
        if isinstance(c, (list, tuple)) and len(c) == 2:
            head.append(f"rolled back to the culprit (position {_esc(c[0])}, block {_esc(c[1])})")
    if refined.get("note"):
        head.append(_esc(refined["note"]))
    if "before_text" not in refined and "after_text" not in refined:
        return f'<div class="note">{" · ".join(head)}</div>'
    cols = []
    for key, label in (("before", "Before"), ("after", "After refinement")):
        score = refined.get(f"{key}_score")
        cols.append(
            f'<div><div class="meta"><b>{label}</b><span class="badge" style="background:{_color(_num(score))};'
            f'color:{_text_color(_num(score))}">score {_fmt(score)}</span></div>'
            f'<div class="txt">{_esc(refined.get(f"{key}_text", ""))}</div></div>'
        )
    return (
        (f'<div class="note">{" · ".join(head)}</div>' if head else "")
        + '<div class="refine">'
        + "".join(cols)
        + "</div>"
    )


def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def _section(item: ReportItem, sec: int) -> str:
    title = item.title or f"Generation {sec + 1}"
    s = item.score
    culprit = (
        f"culprit: block {item.culprit[1]}, position {item.culprit[0]}"
        + (f" (token {_esc(repr(item.tokens[item.culprit_column()]))})" if item.culprit_column() is not None else "")
        if item.culprit is not None
        else "no culprit (no scored tokens)"
    )
    parts = [
        f'<section class="gen" id="gen-{sec}">',
        f"<h2>{_esc(title)}</h2>",
        '<div class="meta">',
        f'<span class="badge" style="background:{_color(s)};color:{_text_color(s)}">flow score {_fmt(s)}</span>',
        f"<span>{culprit}</span>",
        f"<span>{item.num_blocks} blocks × {len(item.tokens)} scored tokens</span>",
        "<span><b>abstained</b> (streaming check)</span>" if item.abstained else "",
        "</div>",
        "<h3>Prompt</h3>",
        f'<div class="prompt">{_esc(item.prompt)}</div>',
        "<h3>Answer, tokens shaded by "
        + ("token risk (flow_token_scores)" if item.token_risks is not None else "event score (max over depth)")
        + "</h3>",
        _answer_html(item, sec),
        _legend(),
        "<h3>Depth × token event scores</h3>",
        _heatmap_svg(item, sec),
        "<h3>Flow features over depth at the culprit token</h3>",
        _curves_html(item),
    ]
    if item.refined:
        parts += ["<h3>Refinement</h3>", _refine_html(item.refined)]
    parts.append("</section>")
    return "\n".join(p for p in parts if p)


def render_report(
    items: ReportItem | Sequence[ReportItem],
    path: str | os.PathLike[str] | None = None,
    *,
    title: str = "hf_flowcheck report",
    subtitle: str | None = None,
) -> str:
    """Render a self-contained HTML page (inline CSS/SVG/JS, no network) for one or more generations.

    Args:
        items: One :class:`ReportItem` or several (see :func:`report_items_from_output`).
        path: Also write the page here (UTF-8).
        title: Page title.
        subtitle: A line under the title (e.g. which model and validator made the scores).

    Returns:
        The HTML text.
    """
    if isinstance(items, ReportItem):
        items = [items]
    items = list(items)
    if not all(isinstance(it, ReportItem) for it in items):
        raise TypeError("render_report() takes ReportItem objects; build them with report_items_from_output().")
    rows = "".join(
        f'<tr><td><a href="#gen-{i}">{_esc(it.title or f"Generation {i + 1}")}</a></td>'
        f"<td>{_fmt(it.score)}</td><td>{len(it.tokens)}</td>"
        f"<td>{'block ' + str(it.culprit[1]) if it.culprit else '–'}</td></tr>"
        for i, it in enumerate(items)
    )
    summary = (
        '<table class="summary"><tr><th>generation</th><th>flow score</th><th>scored tokens</th>'
        f"<th>culprit</th></tr>{rows}</table>"
        if len(items) > 1
        else ""
    )
    from hf_flowcheck.version import __version__

    doc = "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{_esc(title)}</title>",
            f"<style>{_CSS}</style></head><body>",
            f"<h1>{_esc(title)}</h1>",
            f'<p class="sub">{_esc(subtitle) if subtitle else ""} hf_flowcheck {_esc(__version__)} · '
            "scores: higher = more likely hallucinated</p>",
            '<div id="flowcheck-errors"></div>',
            summary,
            *(_section(it, i) for i, it in enumerate(items)),
            f"<script>{_JS}</script>",
            "</body></html>",
        ]
    )
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(doc, encoding="utf-8")
    return doc


# ---------------------------------------------------------------------------------------------
# PNG
# ---------------------------------------------------------------------------------------------


def save_heatmap_png(item: ReportItem, path: str | os.PathLike[str], *, dpi: int = 150) -> Path:
    """Write the depth × token event-score heatmap of ``item`` as a PNG (needs matplotlib).

    Args:
        item: A :class:`ReportItem`.
        path: Output file.
        dpi: Resolution.

    Returns:
        The path written.

    Raises:
        ImportError: Without matplotlib (``pip install "hf-flowcheck[plot]"``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        from matplotlib.colors import LinearSegmentedColormap
        from matplotlib.patches import Rectangle
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            'save_heatmap_png needs matplotlib: pip install "hf-flowcheck[plot]" (or pip install matplotlib).'
        ) from err
    import numpy as np

    probs = np.array(item.event_probs, dtype=float).reshape(item.num_blocks, len(item.tokens))
    cmap = LinearSegmentedColormap.from_list("flowcheck", [tuple(c / 255 for c in s) for s in _STOPS])
    cmap = cmap.with_extremes(bad="#e8e8e8")
    n_b, n_t = probs.shape
    fig_w = min(24.0, max(5.0, 1.8 + 0.32 * n_t))
    fig_h = min(14.0, max(3.0, 1.6 + 0.22 * n_b))
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    try:
        im = ax.imshow(
            np.ma.masked_invalid(probs), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest"
        )
        ax.set_ylabel("block")
        ax.set_xlabel("answer token")
        if n_t <= 80:
            ax.set_xticks(range(n_t))
            ax.set_xticklabels([_visible(t)[:14] for t in item.tokens], rotation=60, ha="right", fontsize=8)
        col = item.culprit_column()
        if col is not None and item.culprit is not None:
            b0 = item.culprit[1]
            ax.add_patch(Rectangle((col - 0.5, b0 - 0.5), 1, 1, fill=False, edgecolor="#0b57d0", linewidth=2.5))
            ax.plot([col], [b0], marker="x", color="#0b57d0", markersize=8, mew=2)
        ax.set_title(f"{item.title or 'flow event scores'} · score {_fmt(item.score)}", fontsize=10)
        fig.colorbar(im, ax=ax, label="event score (higher = more likely hallucinated)", fraction=0.03, pad=0.01)
        fig.tight_layout()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=dpi)
    finally:
        plt.close(fig)
    return out

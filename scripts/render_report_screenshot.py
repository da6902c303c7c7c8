"""Render an hf_flowcheck HTML report in headless Chromium: a screenshot, and a check for script errors.

Needs Debian's Chromium, which this script does not install::

    apt-get update && apt-get install -y chromium

Usage::

    # Generate a report from the real default model (offline SmolLM2-135M-Instruct), then screenshot it:
    python scripts/render_report_screenshot.py --generate --out-dir docs/images

    # Screenshot an existing report:
    python scripts/render_report_screenshot.py --html report.html --out-dir /tmp/shots

With ``--generate`` the validator is the bundled one trained on the base model when
``hf_flowcheck/bundled/validators/`` has one; otherwise a *randomly initialised* validator is used
(its scores are meaningless; the picture shows the layout only) and the page and the caption say so.

Script errors are caught two ways: Chromium's console log (``--enable-logging=stderr --v=0``,
scanned for ``Uncaught`` and ``ERROR:CONSOLE``) and a ``--dump-dom`` pass, in which the report's own
error sink (``#flowcheck-errors``) must be empty and ``body[data-flowcheck-ready]`` set. The exit
status is 1 when either finds a problem.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
CONSOLE_PATTERNS = ("Uncaught", "ERROR:CONSOLE", "Unhandled rejection")
QUESTION = "Which engineer is the Eiffel Tower named after, and in which year was it completed?"
KNOWLEDGE = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
    "It is named after the engineer Gustave Eiffel, whose company designed and built the tower "
    "from 1887 to 1889."
)


def find_chromium(explicit: str | None = None) -> str:
    for cand in (explicit, "/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if cand and Path(cand).exists():
            return cand
    raise SystemExit("Chromium not found; install it with: apt-get update && apt-get install -y chromium")


def _run_chromium(chromium: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="flowcheck-chromium-") as profile:
        cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def screenshot(html: Path, png: Path, *, chromium: str, window: str = "1400,1800", timeout: float = 120) -> list[str]:
    """Screenshot ``html`` into ``png``; return the console-error lines Chromium logged."""
    png.parent.mkdir(parents=True, exist_ok=True)
    proc = _run_chromium(
        chromium,
        [
            "--enable-logging=stderr",
            "--v=0",
            f"--screenshot={png}",
            f"--window-size={window}",
            html.resolve().as_uri(),
        ],
        timeout,
    )
    if not png.is_file():
        raise RuntimeError(f"Chromium wrote no screenshot (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    log = proc.stdout + proc.stderr
    return [line for line in log.splitlines() if any(p in line for p in CONSOLE_PATTERNS)]


def dom_errors(html: Path, *, chromium: str, timeout: float = 120) -> list[str]:
    """Load ``html`` with ``--dump-dom`` and return the errors the page recorded (or a missing-ready note)."""
    proc = _run_chromium(chromium, ["--dump-dom", html.resolve().as_uri()], timeout)
    dom = proc.stdout
    problems = []
    m = re.search(r'<div id="flowcheck-errors">(.*?)</div>', dom, re.S)
    if m and m.group(1).strip():
        problems += [line for line in m.group(1).strip().splitlines() if line.strip()]
    if 'data-flowcheck-ready="1"' not in dom:
        problems.append("the report's script did not finish (body[data-flowcheck-ready] not set)")
    return problems


def generate_report(html: Path, max_new_tokens: int = 24) -> str:
    """Generate one answer on the offline default model and write its report; return the caption."""
    import torch

    from hf_flowcheck import FlowCheckedModelForCausalLM, FlowValidator, ValidatorConfig
    from hf_flowcheck.bundled import default_validator_for
    from hf_flowcheck.offline_models import DEFAULT_MODEL
    from hf_flowcheck.report import render_report, report_items_from_output

    torch.set_num_threads(2)
    model = FlowCheckedModelForCausalLM.from_pretrained(DEFAULT_MODEL, validator=None)
    validator = default_validator_for(model.get_base_model(), name=DEFAULT_MODEL)
    if validator is not None:
        which = "the bundled validator trained on this model"
        model = FlowCheckedModelForCausalLM(model.get_base_model(), validator, tokenizer=model.tokenizer)
    else:
        which = "a RANDOMLY INITIALISED validator (no bundled validator exists yet): the scores are meaningless"
        cfg = model.flow_config
        torch.manual_seed(0)
        validator = FlowValidator(ValidatorConfig.from_feature_names(cfg.feature_names), flow_config=cfg)
        validator.set_base_model(model.get_base_model(), base_id=DEFAULT_MODEL)
        model = FlowCheckedModelForCausalLM(model.get_base_model(), validator.eval(), tokenizer=model.tokenizer)
    tok = model.tokenizer
    prompt = f"Knowledge: {KNOWLEDGE}\nQuestion: {QUESTION}\nAnswer:"
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            return_flow_scores=True,
            return_flow_features=True,
        )
    refinement = None
    if hasattr(model, "refine"):  # hf_flowcheck.refinement, when present
        try:
            refinement = model.refine(out, rows=[0])  # shown even below the threshold
        except Exception as err:  # the picture does not depend on it
            print(f"(refinement skipped: {type(err).__name__}: {err})", file=sys.stderr)
    items = report_items_from_output(out, tok, prompts=[prompt], refinements=refinement)
    items[0].title = QUESTION
    caption = f"{DEFAULT_MODEL}, greedy, {max_new_tokens} new tokens; validator: {which}."
    render_report(items, html, title="hf_flowcheck report", subtitle=caption)
    return caption


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--html", type=Path, help="An existing report to render.")
    src.add_argument("--generate", action="store_true", help="Generate a report from the offline default model.")
    p.add_argument("--out-dir", type=Path, default=REPO / "docs" / "images")
    p.add_argument("--name", default="report", help="Base name of the written files.")
    p.add_argument("--window-size", default="1400,1800")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--keep-html", action="store_true", help="With --generate: copy the HTML next to the PNG.")
    p.add_argument("--chromium", default=None, help="Path to the Chromium binary.")
    args = p.parse_args(argv)

    chromium = find_chromium(args.chromium)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    caption = None
    with tempfile.TemporaryDirectory(prefix="flowcheck-report-") as tmp:
        html = args.html
        if args.generate:
            html = Path(tmp) / f"{args.name}.html"
            caption = generate_report(html, args.max_new_tokens)
            if args.keep_html:
                shutil.copyfile(html, args.out_dir / f"{args.name}.html")
        png = args.out_dir / f"{args.name}.png"
        console = screenshot(html, png, chromium=chromium, window=args.window_size)
        dom = dom_errors(html, chromium=chromium)
    result = {"png": str(png), "console_errors": console, "dom_errors": dom, "caption": caption}
    print(json.dumps(result, indent=2))
    return 1 if console or dom else 0


if __name__ == "__main__":
    sys.exit(main())

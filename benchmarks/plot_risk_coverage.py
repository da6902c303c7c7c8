"""Risk–coverage curves of every detector in a ``flowcheck compare --json`` report.

Each detector abstains on its highest scores first; at coverage c the selective risk is the
fraction of hallucinated (label 1) answers among the kept ones. The dashed line is the risk of
answering everything; each curve's area (AURC, lower is better) is in the legend and in the
report's table. Curves come from the test-split scores the report stores.

Run: ``python benchmarks/plot_risk_coverage.py runs/cmp/compare-qa-gen.json --out docs/images/risk-coverage-qa-gen.png``
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", help="JSON written by `flowcheck compare --json`.")
    ap.add_argument("--out", required=True, help="PNG to write.")
    ap.add_argument("--title", default=None)
    ap.add_argument("--positive", default="hallucinated", help="What label 1 means, for the axis label.")
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hf_flowcheck.metrics import risk_coverage_curve

    with open(args.report) as fh:
        report = json.load(fh)
    labels = report["labels"]["test"]
    fig, ax = plt.subplots(figsize=(6.4, 6.0), dpi=150)
    for name, split_scores in report["scores"].items():
        curve = risk_coverage_curve(labels, split_scores["test"])
        ax.plot(curve["coverage"], curve["risk"], label=f"{name} (AURC {curve['aurc']:.3f})", lw=1.4)
    base = sum(labels) / len(labels)
    ax.axhline(base, ls="--", color="grey", lw=1, label=f"answer everything (risk {base:.3f})")
    ax.set_xlabel("coverage (fraction of answers kept)")
    ax.set_ylabel(f"selective risk ({args.positive} among kept)")
    ax.set_title(args.title or f"{report.get('protocol', '')} protocol, test split (n = {len(labels)})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)  # below: curves fill the axes
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()

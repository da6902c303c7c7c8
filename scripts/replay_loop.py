"""Keep re-extracting complete parts of a growing answers file (runs beside the answer generation)."""

import argparse
import time

from hf_flowcheck.configuration import FlowConfig
from hf_flowcheck.offline_models import load_model
from hf_flowcheck.workflows.replay import replay_answers

p = argparse.ArgumentParser()
p.add_argument("--model", default="SmolLM2-135M-Instruct")
p.add_argument("--answers", required=True)
p.add_argument("--out", required=True)
p.add_argument("--part-size", type=int, default=500)
p.add_argument("--until", type=int, default=3000, help="stop once this many answers are extracted")
p.add_argument("--final", action="store_true", help="also extract the last incomplete part, then stop")
p.add_argument("--start-part", type=int, default=0)
p.add_argument("--skip-started", action="store_true")
a = p.parse_args()
model, tok = load_model(a.model)
cfg = FlowConfig(lens_features=True, state_summary="last")
while True:
    parts = replay_answers(
        model, tok, a.answers, a.out, config=cfg, part_size=a.part_size, include_partial=a.final,
        start_part=a.start_part, skip_started=a.skip_started,
    )
    print(time.strftime("%H:%M:%S"), "parts done:", len(parts), flush=True)
    if a.final or len(parts) * a.part_size >= a.until:
        break
    time.sleep(60)

"""The quick Python examples run end to end on the offline default model (subprocess, with a timeout).

Each took under 25 s on a loaded 2-core CPU machine (none is over 60 s, so none is marked ``slow``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


needs_model = pytest.mark.real_model


def _run(script: str, *args: str, timeout: float = 900) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("OMP_NUM_THREADS", "2")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=EXAMPLES.parent,
        check=False,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


@needs_model
def test_quickstart():
    out = _run("quickstart.py", "--max-new-tokens", "8")
    assert "Flow score:" in out and "Culprit:" in out
    assert "x 30 blocks x" in out  # SmolLM2-135M has 30 blocks


@needs_model
def test_push_to_hub_dry_run(tmp_path):
    out = _run("push_to_hub_dry_run.py", "--out", str(tmp_path / "saved"))
    assert "create_repo(" in out and "upload_folder(" in out and "nothing was sent" in out
    for name in ("model.safetensors", "config.json", "README.md"):
        assert f"uploads {name}" in out
    assert (tmp_path / "saved" / "validator" / "model.safetensors").is_file()
    assert (tmp_path / "saved" / "flow_config.json").is_file()


@needs_model
def test_streaming_abstention():
    # Threshold 0 makes every row abstain at the first check (4 tokens), whatever the validator; 12 tokens
    # leave room for the whole message (one that does not fit is not started).
    out = _run("streaming_abstention.py", "--threshold", "0.0", "--max-new-tokens", "12")
    assert out.count("abstained: True") == 2
    assert "I am not sure" in out


@needs_model
def test_stream_risk_example_streams_the_demo_questions():
    out = _run("stream_risk.py", "--max-new-tokens", "4", "--serve")
    assert out.count("Q: ") == 2 and "data: " in out

"""Save a flow validator and show what ``push_to_hub`` would upload, with the HTTP layer mocked.

    python examples/push_to_hub_dry_run.py [--out my-flowcheck] [--repo-id your-name/smollm2-flow-validator]

Nothing leaves the machine: ``HfApi.create_repo`` and ``HfApi.upload_folder`` are replaced by
stand-ins that record what they were given. Uses the bundled validator when there is one,
otherwise a RANDOMLY INITIALISED validator (it says so), which is fine for showing the files.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: no request can reach the Hub

import torch
from huggingface_hub import HfApi

from hf_flowcheck import FlowCheckedModelForCausalLM, FlowValidator, ValidatorConfig


def load(base: str) -> FlowCheckedModelForCausalLM:
    model = FlowCheckedModelForCausalLM.from_pretrained(base)
    if model.validator is None:
        print("NOTE: no bundled validator: saving a RANDOMLY INITIALISED one (its files look the same).\n")
        cfg = model.flow_config
        torch.manual_seed(0)
        v = FlowValidator(ValidatorConfig.from_feature_names(cfg.feature_names), flow_config=cfg)
        v.set_base_model(model.get_base_model(), base_id=base)
        model = FlowCheckedModelForCausalLM(model.get_base_model(), v.eval(), tokenizer=model.tokenizer)
    return model


def _listing(folder: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--out", default=None, help="Folder for save_pretrained (default: a temporary folder).")
    p.add_argument("--repo-id", default="your-name/smollm2-135m-flow-validator")
    args = p.parse_args()
    torch.set_num_threads(2)
    model = load(args.model)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or Path(tmp) / "my-flowcheck")
        model.save_pretrained(out)
        print(f"save_pretrained({str(out)!r}) wrote:")
        for name, size in _listing(out):
            print(f"  {name:40s} {size:>10,d} bytes")

        calls: list[tuple[str, dict]] = []

        def fake_create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
            return SimpleNamespace(repo_id=repo_id)

        def fake_upload_folder(self, *, repo_id, folder_path, **kwargs):
            files = _listing(Path(folder_path))  # read now: the folder is temporary
            calls.append(("upload_folder", {"repo_id": repo_id, "files": files, **kwargs}))
            return f"https://huggingface.co/{repo_id}/commit/dry-run"

        with (
            mock.patch.object(HfApi, "create_repo", fake_create_repo),
            mock.patch.object(HfApi, "upload_folder", fake_upload_folder),
        ):
            url = model.push_to_hub(args.repo_id, private=True, commit_message="Add flow validator")

    print(f"\npush_to_hub({args.repo_id!r}) would make these requests (mocked; nothing was sent):")
    for name, kw in calls:
        files = kw.pop("files", None)
        print(f"  {name}({', '.join(f'{k}={v!r}' for k, v in kw.items() if v is not None)})")
        for fname, size in files or []:
            print(f"      uploads {fname:34s} {size:>10,d} bytes")
    print(f"and return {url!r}")
    card = (out / "validator" / "README.md") if args.out else None
    if card is not None and card.is_file():
        print("\nModel card (first lines):\n" + "\n".join(card.read_text().splitlines()[:12]))


if __name__ == "__main__":
    main()

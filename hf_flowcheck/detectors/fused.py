"""A logistic regression stacked on other detectors' scores, saved like every hf_flowcheck detector."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from huggingface_hub import ModelHubMixin

from hf_flowcheck.detectors.baselines import train_logistic_regression
from hf_flowcheck.detectors.checkpoint import SavedDetectorMixin, card_front_matter
from hf_flowcheck.version import __version__

__all__ = ["FusedDetector"]


class FusedDetector(
    SavedDetectorMixin,
    ModelHubMixin,
    library_name="hf_flowcheck",
    tags=["hf_flowcheck", "hallucination-detection", "fused-detector"],
):
    """Logistic regression stacked on other detectors' scores (fitted on the validation split).

    Saves, loads and pushes like every hf_flowcheck detector; its ``config.json`` names the
    component detectors whose scores it reads, in order.

    Args:
        l2: L2 penalty of the regression.

    Score direction: ``P(hallucinated)`` in ``[0, 1]``, higher = more likely hallucinated.
    """

    name = "fused (stacked logistic regression)"
    FORMAT_VERSION = 1
    CONFIG_KEY = "fused_config"
    WHAT = "fused detector"

    def __init__(self, l2: float = 1e-2) -> None:
        self.l2 = float(l2)
        self.columns: list[str] = []
        self._mean = self._std = self._w = self._b = None

    def fit(self, columns: Mapping[str, np.ndarray], labels: Any) -> FusedDetector:
        """Fit on ``{detector name: validation scores [M]}`` and validation labels ``[M]``."""
        if len(columns) < 2:
            raise ValueError(f"The fused detector needs at least two component scores, got {list(columns)}.")
        self.columns = list(columns)
        x = torch.tensor(np.stack([np.asarray(columns[c], dtype=np.float64) for c in self.columns], 1))
        self._mean, self._std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-9)
        y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self._w, self._b = train_logistic_regression((x - self._mean) / self._std, y, l2=self.l2)
        return self

    def score(self, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        if self._w is None:
            from hf_flowcheck.detectors.base import NotFittedError

            raise NotFittedError("Fit the fused detector on validation scores first (FusedDetector.fit).")
        missing = [c for c in self.columns if c not in columns]
        if missing:
            raise ValueError(f"The fused detector needs scores of {missing}.")
        x = torch.tensor(np.stack([np.asarray(columns[c], dtype=np.float64) for c in self.columns], 1))
        x = (x - self._mean) / self._std
        return torch.sigmoid(x @ self._w + self._b).numpy().astype(np.float64)

    def weights(self) -> dict[str, float]:
        """Standardised coefficient of each component."""
        return {c: float(w) for c, w in zip(self.columns, self._w.tolist())} if self._w is not None else {}

    # -------------------------------------------------------------------------------- I/O
    def check_saveable(self) -> None:
        if self._w is None:
            from hf_flowcheck.detectors.base import NotFittedError

            raise NotFittedError("Fit the fused detector before saving it (FusedDetector.fit).")

    def config_dict(self) -> dict[str, Any]:
        return {"fused_config": {"l2": self.l2, "columns": list(self.columns)}}

    @classmethod
    def from_config_dict(cls, config: dict[str, Any], **model_kwargs: Any) -> FusedDetector:
        settings = config.get("fused_config") or {}
        columns = settings.get("columns")
        if not isinstance(columns, list) or len(columns) < 2 or not all(isinstance(c, str) for c in columns):
            raise ValueError("fused_config.columns must list at least two component detector names")
        det = cls(l2=settings.get("l2", 1e-2))
        det.columns = columns
        return det

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"mean": self._mean, "std": self._std, "weight": self._w, "bias": torch.as_tensor(self._b).reshape(1)}

    def load_state_tensors(self, path: str, *, map_location: str = "cpu", strict: bool = True) -> None:
        from safetensors.torch import load_file

        from hf_flowcheck.errors import CheckpointError

        try:
            state = load_file(path, device=str(map_location))
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise CheckpointError(
                f"{path!r} is not a readable safetensors file ({err}); re-save the detector."
            ) from err
        n = len(self.columns)
        if set(state) != {"mean", "std", "weight", "bias"} or any(
            state[k].numel() != n for k in ("mean", "std", "weight")
        ):
            raise CheckpointError(f"{path!r} does not hold the weights of a fused detector over {n} components.")
        if not all(bool(torch.isfinite(v).all()) for v in state.values()):
            raise CheckpointError(f"The weights in {path!r} hold NaN/inf; the checkpoint is broken.")
        self._mean, self._std = state["mean"].double(), state["std"].double()
        self._w, self._b = state["weight"].double(), state["bias"].double()[0]

    def model_card_text(self) -> str:
        lines = card_front_matter(("hf_flowcheck", "fused-detector"))
        lines += [
            "# Fused detector",
            "",
            "A logistic regression stacked on these detectors' scores (standardised):",
            "",
        ]
        lines += [f"- `{c}`: weight {w:+.3f}" for c, w in self.weights().items()]
        lines += ["", "`score` = P(hallucinated) in [0, 1]; **higher = more likely hallucinated**.", ""]
        lines += [f"Written by hf_flowcheck {__version__} (format version {self.FORMAT_VERSION}).", ""]
        return "\n".join(lines)

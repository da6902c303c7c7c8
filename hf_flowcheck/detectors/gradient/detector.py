"""The gradient detector: signatures in, a class probability (and a hallucination score) out."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from hf_flowcheck.detectors.base import Detector, NotFittedError, ScoredExample
from hf_flowcheck.detectors.checkpoint import SavedDetectorMixin, card_front_matter, fingerprint_table, jsonable
from hf_flowcheck.detectors.gradient.config import (
    CLASS_NAMES,
    GradientConfig,
)
from hf_flowcheck.detectors.gradient.reader import LogisticReader, TransformerReader, signature_features
from hf_flowcheck.detectors.gradient.signature import gradient_signatures
from hf_flowcheck.fingerprint import CHECKED_FIELDS, check_fingerprint, model_fingerprint
from hf_flowcheck.metrics import auroc
from hf_flowcheck.version import __version__

__all__ = ["GradientDetector"]


class GradientDetector(
    nn.Module,
    SavedDetectorMixin,
    PyTorchModelHubMixin,
    Detector,
    library_name="hf_flowcheck",
    tags=["hf_flowcheck", "hallucination-detection", "gradient-signatures"],
):
    """Gradient-signature hallucination (and abstention) detector.

    Args:
        gradient_config: :class:`GradientConfig` or its dict.
        num_layers: ``L_sel``; set by :meth:`fit` (given when loading).
        signature_dim: ``D``; set by :meth:`fit` (given when loading).
        block_indices: The selected block indices (for people and checks).
        base_fingerprint: :func:`hf_flowcheck.fingerprint.model_fingerprint` of the base model.
        training_metadata: JSON-serialisable facts (history, evaluation, command).

    Score direction: :meth:`score` is ``P(hallucinated)`` in ``[0, 1]``, higher = more likely
    hallucinated. With ``classes=3`` :meth:`predict_proba` also gives ``P(did not answer)``.

    Example:
        >>> det = GradientDetector(GradientConfig(reader="logistic", epochs=5))
        >>> g = torch.randn(20, 3, 8); y = torch.arange(20) % 2
        >>> det.fit(g, y, g, y).score(g).shape
        (20,)
    """

    FORMAT_VERSION: ClassVar[int] = 1
    CONFIG_KEY: ClassVar[str] = "gradient_config"
    WHAT: ClassVar[str] = "gradient detector"
    trainable = True
    score_range = "[0, 1]"

    def __init__(
        self,
        gradient_config: GradientConfig | dict | None = None,
        *,
        num_layers: int | None = None,
        signature_dim: int | None = None,
        block_indices: list[int] | None = None,
        base_fingerprint: dict | None = None,
        training_metadata: dict | None = None,
    ) -> None:
        super().__init__()
        self.config = GradientConfig.from_dict(gradient_config if gradient_config is not None else GradientConfig())
        if base_fingerprint is not None and not isinstance(base_fingerprint, dict):
            raise ValueError("base_fingerprint must be a dict from hf_flowcheck.fingerprint.model_fingerprint().")
        if training_metadata is not None and not isinstance(training_metadata, dict):
            raise ValueError(f"training_metadata must be a dict, got {type(training_metadata).__name__}.")
        self.base_fingerprint: dict[str, Any] | None = dict(base_fingerprint) if base_fingerprint else None
        self.training_metadata: dict[str, Any] = dict(training_metadata or {})
        self.block_indices: list[int] | None = list(block_indices) if block_indices is not None else None
        self.num_layers: int | None = None
        self.signature_dim: int | None = None
        self.reader: nn.Module | None = None
        if (num_layers is None) != (signature_dim is None):
            raise ValueError("Give both num_layers and signature_dim (as saved by GradientDetector) or neither.")
        if num_layers is not None and signature_dim is not None:
            self._build(int(num_layers), int(signature_dim))

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"gradient signatures ({self.config.layers if self.config.layers != 'all' else 'all'} blocks)"

    @property
    def num_classes(self) -> int:
        return self.config.classes

    def _build(self, num_layers: int, signature_dim: int) -> None:
        c, f = self.config.classes, self.config.classes + 1
        self.num_layers, self.signature_dim = num_layers, signature_dim
        self.register_buffer("references", torch.zeros(c, num_layers, signature_dim))
        self.register_buffer("feature_mean", torch.zeros(num_layers, f))
        self.register_buffer("feature_std", torch.ones(num_layers, f))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            if self.config.reader == "transformer":
                self.reader = TransformerReader(num_layers, f, c, self.config)
            else:
                self.reader = LogisticReader(num_layers, f, c)

    @property
    def is_fitted(self) -> bool:
        return self.reader is not None and bool(self.fitted)

    # -------------------------------------------------------------------------- featurize
    def featurize(self, model: nn.Module, examples: Sequence[ScoredExample], *, tokenizer: Any = None) -> torch.Tensor:
        """Gradient signatures ``[N, L_sel, D]`` of ``examples`` with this detector's config."""
        if self.base_fingerprint is not None:
            self.check_compatible(model)
        return gradient_signatures(model, examples, self.config)

    def _check_signatures(self, signatures: Any) -> torch.Tensor:
        if isinstance(signatures, (list, tuple)):
            signatures = torch.stack([torch.as_tensor(s) for s in signatures])
        if not isinstance(signatures, torch.Tensor) or signatures.dim() != 3:
            raise ValueError(
                f"signatures must be a [N, L, D] tensor (gradient_signatures()), got "
                f"{getattr(signatures, 'shape', type(signatures).__name__)}."
            )
        if self.num_layers is not None and tuple(signatures.shape[1:]) != (self.num_layers, self.signature_dim):
            raise ValueError(
                f"signatures have [L, D] = {list(signatures.shape[1:])} but this detector was fitted on "
                f"[{self.num_layers}, {self.signature_dim}]; compute them with the detector's GradientConfig "
                f"(layers={self.config.layers!r}, sketch={self.config.sketch!r}) on the same base model."
            )
        if not bool(torch.isfinite(signatures).all()):
            raise ValueError("signatures hold NaN/inf; recompute them with the model in float32.")
        return signatures.to(torch.float32)

    def _labels(self, labels: Any, n: int, what: str) -> torch.Tensor:
        y = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)
        if y.shape[0] != n:
            raise ValueError(f"{what} has {y.shape[0]} labels for {n} signatures.")
        bad = sorted(set(y.tolist()) - set(range(self.config.classes)))
        if bad:
            raise ValueError(
                f"{what} holds label(s) {bad}; with classes={self.config.classes} labels are "
                f"{list(range(self.config.classes))} ({', '.join(CLASS_NAMES[: self.config.classes])})."
                + (" Use abstention_labels() and classes=3 for did-not-answer." if 2 in bad else "")
            )
        return y

    # -------------------------------------------------------------------------------- fit
    def fit(  # type: ignore[override]
        self,
        signatures: torch.Tensor,
        labels: Any,
        val_signatures: torch.Tensor | None = None,
        val_labels: Any = None,
    ) -> GradientDetector:
        """Compute the class references on the training split and train the reader.

        Args:
            signatures: ``[N, L, D]`` training signatures.
            labels: ``[N]`` class labels (0 correct, 1 hallucinated, 2 did not answer if ``classes=3``).
            val_signatures: ``[M, L, D]`` validation signatures; select the reader's epoch (AUROC of
                ``P(hallucinated)``; validation cross-entropy when it holds one class only).
            val_labels: ``[M]``.

        Returns:
            ``self`` (in eval mode).

        Raises:
            ValueError: A class has no training example (the message names it), or shapes disagree.
        """
        x = self._check_signatures(signatures)
        y = self._labels(labels, x.shape[0], "labels")
        counts = torch.bincount(y, minlength=self.config.classes)
        missing = [f"{c} ({CLASS_NAMES[c]!r})" for c in range(self.config.classes) if counts[c] == 0]
        if missing:
            raise ValueError(
                f"The training split has no example of class {', '.join(missing)}, so its reference gradient cannot "
                f"be computed. Add such examples, or use classes=2"
                + (" (drop the did-not-answer class)." if self.config.classes == 3 else ".")
            )
        if self.num_layers is None or (self.num_layers, self.signature_dim) != tuple(x.shape[1:]):
            self._build(int(x.shape[1]), int(x.shape[2]))
        assert self.reader is not None
        refs = torch.stack([x[y == c].mean(0) for c in range(self.config.classes)])
        self.references.copy_(refs)
        feats = signature_features(x, refs)
        mean, std = feats.mean(0), feats.std(0, unbiased=False).clamp_min(1e-6)
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std)
        feats = (feats - mean) / std
        vx = vy = None
        if val_signatures is not None:
            if val_labels is None:
                raise ValueError("val_signatures given without val_labels.")
            vs = self._check_signatures(val_signatures)
            vy = self._labels(val_labels, vs.shape[0], "val_labels")
            vx = (signature_features(vs, refs) - mean) / std
        history = self._train_reader(feats, y, counts, vx, vy)
        self.fitted.fill_(True)
        self.training_metadata["history"] = history
        self.training_metadata["train_counts"] = {CLASS_NAMES[c]: int(counts[c]) for c in range(self.config.classes)}
        return self.eval()

    def _train_reader(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        counts: torch.Tensor,
        vx: torch.Tensor | None,
        vy: torch.Tensor | None,
    ) -> dict[str, Any]:
        cfg = self.config
        reader = self.reader
        assert reader is not None
        weight = (counts.sum() / (len(counts) * counts.clamp_min(1))).to(torch.float32)
        loss_fn = nn.CrossEntropyLoss(weight=weight)
        opt = torch.optim.AdamW(reader.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        gen = torch.Generator().manual_seed(cfg.seed)
        best_state = {k: v.detach().clone() for k, v in reader.state_dict().items()}
        best, best_epoch, stale, epochs_run = -math.inf, 0, 0, 0
        use_auroc = vy is not None and len(set((vy == 1).tolist())) == 2
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            for epoch in range(1, cfg.epochs + 1):
                epochs_run = epoch
                reader.train()
                order = torch.randperm(x.shape[0], generator=gen)
                for start in range(0, x.shape[0], cfg.batch_size):
                    idx = order[start : start + cfg.batch_size]
                    opt.zero_grad(set_to_none=True)
                    loss = loss_fn(reader(x[idx]), y[idx])
                    loss.backward()
                    opt.step()
                if vx is None:
                    best_epoch = epoch
                    continue
                reader.eval()
                with torch.no_grad():
                    logits = reader(vx)
                if use_auroc:
                    p1 = torch.softmax(logits, -1)[:, 1].numpy().astype(np.float64)
                    metric = auroc((vy == 1).numpy().astype(np.int64), p1)  # type: ignore[union-attr]
                else:
                    metric = -float(nn.functional.cross_entropy(logits, vy))
                if metric > best + 1e-9:
                    best, best_epoch, stale = metric, epoch, 0
                    best_state = {k: v.detach().clone() for k, v in reader.state_dict().items()}
                else:
                    stale += 1
                    if stale >= cfg.patience:
                        break
        if vx is not None:
            reader.load_state_dict(best_state)
        reader.eval()
        return {
            "best_epoch": best_epoch,
            "epochs_run": epochs_run,
            "selection": ("validation AUROC" if use_auroc else "validation cross-entropy")
            if vx is not None
            else "last epoch (no validation split)",
            "best_validation": None if vx is None else float(best),
        }

    # ------------------------------------------------------------------------------ score
    @torch.no_grad()
    def predict_proba(self, signatures: torch.Tensor) -> np.ndarray:
        """Class probabilities ``float64 [N, C]`` (columns: correct, hallucinated[, did not answer]).

        Raises:
            NotFittedError: Before :meth:`fit` or loading.
        """
        self.require_fitted()
        assert self.reader is not None
        x = self._check_signatures(signatures).to(self.references.device)
        feats = (signature_features(x, self.references) - self.feature_mean) / self.feature_std
        was = self.training
        self.eval()
        try:
            probs = torch.softmax(self.reader(feats), -1)
        finally:
            self.train(was)
        return probs.cpu().numpy().astype(np.float64)

    def score(self, features: torch.Tensor) -> np.ndarray:  # type: ignore[override]
        """``P(hallucinated)`` ``float64[N]`` in ``[0, 1]`` (higher = more likely hallucinated)."""
        return self.predict_proba(features)[:, 1]

    def abstention_score(self, signatures: torch.Tensor) -> np.ndarray:
        """``P(did not answer)`` ``float64[N]`` (``classes=3`` only)."""
        if self.config.classes != 3:
            raise ValueError("abstention_score() needs a detector trained with GradientConfig(classes=3).")
        return self.predict_proba(signatures)[:, 2]

    def forward(self, signatures: torch.Tensor) -> torch.Tensor:
        """Class logits ``[N, C]`` (differentiable; use :meth:`predict_proba` for inference)."""
        self.require_fitted()
        assert self.reader is not None
        feats = (signature_features(signatures, self.references) - self.feature_mean) / self.feature_std
        return self.reader(feats)

    # ---------------------------------------------------------------------- compatibility
    def set_base_model(self, model: nn.Module, base_id: str | None = None, revision: str | None = None) -> None:
        """Record ``model``'s fingerprint (checked by :meth:`check_compatible` and loading)."""
        self.base_fingerprint = model_fingerprint(model, base_id=base_id, revision=revision)
        self.block_indices = self.config.select_blocks(int(self.base_fingerprint["num_blocks"]))

    def check_compatible(self, model: nn.Module, fields: Sequence[str] = CHECKED_FIELDS) -> None:
        """Raise :class:`~hf_flowcheck.fingerprint.FingerprintMismatchError` unless ``model`` is the base model."""
        if self.base_fingerprint is None:
            raise ValueError(
                "This gradient detector has no base-model fingerprint; call detector.set_base_model(model) once you "
                "know which model its signatures came from."
            )
        check_fingerprint(self.base_fingerprint, model, fields=fields, what="gradient detector")

    # -------------------------------------------------------------------------------- I/O

    def check_saveable(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(
                "Fit the gradient detector before saving it (save_pretrained() of an unfitted detector)."
            )

    def config_dict(self) -> dict[str, Any]:
        """The detector's own ``config.json`` entries (``SavedDetectorMixin`` adds the stamps)."""
        return {
            "gradient_config": self.config.to_dict(),
            "num_layers": self.num_layers,
            "signature_dim": self.signature_dim,
            "block_indices": self.block_indices,
            "base_fingerprint": jsonable(self.base_fingerprint, "base_fingerprint"),
            "training_metadata": jsonable(self.training_metadata, "training_metadata"),
        }

    @classmethod
    def from_config_dict(cls, config: dict[str, Any], **model_kwargs: Any) -> GradientDetector:
        keys = ("gradient_config", "num_layers", "signature_dim", "block_indices", "base_fingerprint")
        det = cls(**{k: config.get(k) for k in keys}, training_metadata=config.get("training_metadata"))
        if det.reader is None:
            raise ValueError("it has no num_layers/signature_dim (an unfitted detector)")
        return det

    def model_card_text(self) -> str:
        """Markdown of the model card (works offline)."""
        from hf_flowcheck.metrics import format_table

        fp = self.base_fingerprint or {}
        base_id = fp.get("base_id")
        lines = card_front_matter(("hf_flowcheck", "hallucination-detection", "gradient-signatures"))
        lines += [f"# Gradient-signature detector{' for ' + base_id if base_id else ''}", ""]
        lines += [
            "One forward-backward pass over the prompt and the model's answer (loss: mean NLL of the answer tokens), "
            f"restricted to blocks {self.block_indices if self.block_indices is not None else self.config.layers}; "
            "per layer the cosine similarity of the gradient to each class reference and its log-norm are read by a "
            f"{self.config.reader} reader. `score` = P(hallucinated) in [0, 1]; **higher = more likely hallucinated**.",
            "",
            "## Configuration",
            "",
            "`GradientConfig("
            + ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self.config).items() if k != "abstention_patterns")
            + ")`",
            "",
            "## Base model",
            "",
        ]
        lines += fingerprint_table(fp)
        lines += ["", "## Evaluation", ""]
        ev = self.training_metadata.get("evaluation")
        lines += ["```text", format_table(ev), "```"] if ev else ["No evaluation recorded."]
        cmd = self.training_metadata.get("command")
        lines += ["", "## Reproduce", ""] + (["```bash", cmd, "```"] if cmd else ["Not recorded."])
        lines += ["", f"Written by hf_flowcheck {__version__} (format version {self.FORMAT_VERSION}).", ""]
        return "\n".join(lines)

"""Features of a signature against per-class references, and the readers that classify them."""

from __future__ import annotations

import torch
from torch import nn

from hf_flowcheck.detectors.gradient.config import GradientConfig

__all__ = ["LogisticReader", "TransformerReader", "signature_features"]


def signature_features(signatures: torch.Tensor, references: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-layer features: cosine similarity to each class reference, and ``log ‖g_b‖``.

    Args:
        signatures: ``[N, L, D]``.
        references: ``[C, L, D]`` class references (per-layer mean training gradients).
        eps: Floor of the norms.

    Returns:
        ``[N, L, C + 1]``: ``cos(g_nb, ref_cb)`` for each class ``c``, then ``log(‖g_nb‖ + eps)``.
    """
    if signatures.dim() != 3 or references.dim() != 3 or signatures.shape[1:] != references.shape[1:]:
        raise ValueError(
            f"signatures [N, L, D] = {tuple(signatures.shape)} and references [C, L, D] = {tuple(references.shape)} "
            "disagree; compute the signatures with the detector's GradientConfig (same layers and sketch)."
        )
    s = signatures.to(torch.float32)
    r = references.to(device=s.device, dtype=torch.float32)
    sn = s.norm(dim=-1)  # [N, L]
    rn = r.norm(dim=-1)  # [C, L]
    dots = torch.einsum("nld,cld->nlc", s, r)
    cos = dots / (sn.unsqueeze(-1).clamp_min(eps) * rn.T.unsqueeze(0).clamp_min(eps))
    return torch.cat([cos, torch.log(sn + eps).unsqueeze(-1)], dim=-1)


class TransformerReader(nn.Module):
    def __init__(self, num_layers: int, num_inputs: int, num_classes: int, cfg: GradientConfig) -> None:
        super().__init__()
        self.inp = nn.Linear(num_inputs, cfg.d_model)
        self.pos = nn.Parameter(torch.zeros(num_layers, cfg.d_model))
        layer = nn.TransformerEncoderLayer(
            cfg.d_model, cfg.num_heads, dim_feedforward=2 * cfg.d_model, dropout=cfg.dropout, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.reader_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, L, F] -> [N, C]
        h = self.encoder(self.inp(x) + self.pos)
        return self.head(self.norm(h.mean(1)))


class LogisticReader(nn.Module):
    def __init__(self, num_layers: int, num_inputs: int, num_classes: int) -> None:
        super().__init__()
        self.head = nn.Linear(num_layers * num_inputs, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.flatten(1))

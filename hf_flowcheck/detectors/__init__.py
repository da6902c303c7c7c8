"""Detectors: one module per detector, each scoring ``higher = more likely hallucinated``."""

from hf_flowcheck.detectors.flow_validator import (
    CheckpointError,
    FlowValidator,
    FlowValidatorOutput,
    ValidatorConfig,
)

__all__ = ["CheckpointError", "FlowValidator", "FlowValidatorOutput", "ValidatorConfig"]

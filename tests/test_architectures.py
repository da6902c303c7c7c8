"""Every architecture entry: the residual decomposition and the boundary norms are the real ones."""

import pytest
import torch
from conftest import make_tiny_model

from hf_flowcheck import ArchitectureSpec, FlowRecorder, UnsupportedArchitectureError, register_architecture
from hf_flowcheck.architectures import get_architecture, resolve_architecture, supported_architectures
from hf_flowcheck.extraction import FlowExtractor


def _capture_all(model, ids):
    arch = resolve_architecture(model)
    rows, cols = torch.nonzero(torch.ones_like(ids, dtype=torch.bool), as_tuple=True)

    def sel(call, batch, seq, device):
        return (rows, cols, cols) if call == 0 else None

    with FlowRecorder(arch, sel) as rec, torch.no_grad():
        out = model(ids, output_hidden_states=True)
    return arch, rec.result(), out


def test_all_required_families_are_supported():
    need = {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox"}
    assert need <= set(supported_architectures())


def test_residual_decomposition_and_boundary_norms(family):
    model = make_tiny_model(family)
    ids = torch.randint(2, 97, (2, 7))
    arch, st, out = _capture_all(model, ids)
    n_blocks = arch.num_blocks
    assert st.r.shape == (14, n_blocks + 1, 32) and st.o.shape == (14, n_blocks, 32)
    # r[b+1] = r[b] + o[b] + m[b]
    recon = st.r[:, :-1] + st.o + st.m
    torch.testing.assert_close(recon, st.r[:, 1:], atol=1e-5, rtol=1e-5)
    # r[b] is what transformers reports as hidden_states[b] for b < B.
    for b in range(n_blocks):
        torch.testing.assert_close(st.r[:, b], out.hidden_states[b].reshape(-1, 32), atol=1e-6, rtol=1e-6)
    # N_b is the module the model applies to r[b]: record its real inputs and outputs.
    seen = {}
    handles = [
        n.register_forward_hook(lambda mod, a, o, b=b: seen.__setitem__(b, (a[0].detach(), o.detach())))
        for b, n in enumerate(arch.boundary_norms)
    ]
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        for h in handles:
            h.remove()
    ext = FlowExtractor(model)
    for b in range(n_blocks + 1):
        x, y = seen[b]
        torch.testing.assert_close(x.reshape(-1, 32), st.r[:, b], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ext.norms[b](st.r[:, b]), y.reshape(-1, 32), atol=1e-5, rtol=1e-5)
    # The final boundary state, read out, gives the model's logits (up to soft-capping).
    h_final = ext.norms[-1](st.r[:, -1])
    ref = h_final @ arch.readout.T
    if getattr(model.config, "final_logit_softcapping", None):
        cap = model.config.final_logit_softcapping
        ref = torch.tanh(ref / cap) * cap
    torch.testing.assert_close(ref, logits.reshape(-1, 99), atol=1e-4, rtol=1e-4)


def test_gpt_neox_sequential_residual_too():
    model = make_tiny_model("gpt_neox", use_parallel_residual=False)
    _, st, _ = _capture_all(model, torch.randint(2, 97, (1, 5)))
    torch.testing.assert_close(st.r[:, :-1] + st.o + st.m, st.r[:, 1:], atol=1e-5, rtol=1e-5)


def test_unknown_architecture_error_names_it_and_shows_fix():
    class Odd(torch.nn.Module):
        class config:
            model_type = "oddformer"

    with pytest.raises(UnsupportedArchitectureError) as err:
        get_architecture(Odd())
    msg = str(err.value)
    assert "oddformer" in msg and "llama" in msg and "register_architecture(" in msg


def test_register_architecture_and_wrong_path():
    model = make_tiny_model("llama")
    model.config.model_type = "my_llama_variant"
    with pytest.raises(UnsupportedArchitectureError):
        resolve_architecture(model)
    spec = ArchitectureSpec("model.layers", "model.norm", "input_layernorm", "self_attn", "mlp")
    register_architecture("my_llama_variant", spec)
    with pytest.raises(ValueError, match="already registered"):
        register_architecture("my_llama_variant", spec)
    assert resolve_architecture(model).num_blocks == 4
    bad = ArchitectureSpec("model.blocks", "model.norm", "input_layernorm", "self_attn", "mlp")
    with pytest.raises(UnsupportedArchitectureError, match=r"model\.blocks"):
        resolve_architecture(model, bad)


def test_hooks_come_off_on_exception():
    model = make_tiny_model("llama")
    arch = resolve_architecture(model)
    modules = [*arch.blocks, *arch.attn_modules, *arch.mlp_modules, arch.boundary_norms[-1]]
    before = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules]
    with pytest.raises(RuntimeError, match="boom"), FlowRecorder(arch, lambda *a: None) as rec:
        assert rec.active
        raise RuntimeError("boom")
    after = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules]
    assert before == after and not rec.active
    rec.remove()  # idempotent

"""`run_from` (only the blocks above the patched layer compute) equals the full patched forward, logits and the
gradient with respect to the patched activation, on a tiny random model of every architecture the hooks support."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from diffsae.hooks import decoder_layers, read_residual, replace_residual, residual_at, run_from

V, D, L = 97, 32, 4
LLAMA_LIKE = dict(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=L, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
ARCHITECTURES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**LLAMA_LIKE)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**LLAMA_LIKE, sliding_window=4)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**LLAMA_LIKE)),
    "gemma2": lambda: Gemma2ForCausalLM(Gemma2Config(**LLAMA_LIKE, head_dim=8, sliding_window=4)),
    "gemma3": lambda: Gemma3ForCausalLM(Gemma3TextConfig(**LLAMA_LIKE, head_dim=8, sliding_window=4)),
    "gpt_neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=V, hidden_size=D, intermediate_size=64,
                                                         num_hidden_layers=L, num_attention_heads=4)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=D, n_layer=L, n_head=4, n_positions=64)),
}  # fmt: skip


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids_BT = torch.randint(0, V, (2, 9), generator=g)
    mask_BT = torch.ones_like(ids_BT)
    mask_BT[1, 6:] = 0  # a right-padded row
    pos_BT = (mask_BT.cumsum(1) - 1).clamp(min=0)
    return ids_BT, mask_BT, pos_BT


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("layer", [0, 2])
def test_run_from_equals_the_full_patched_forward(arch: str, layer: int) -> None:
    torch.manual_seed(1)
    model = ARCHITECTURES[arch]().eval()
    ids_BT, mask_BT, pos_BT = _inputs()
    kw = {"input_ids": ids_BT, "attention_mask": mask_BT, "position_ids": pos_BT, "use_cache": False}
    with torch.no_grad(), read_residual(model, layer) as cap:
        model(**kw)
    h_BTD = (cap.value + 0.3 * torch.randn(cap.value.shape, generator=torch.Generator().manual_seed(2)))

    h_full = h_BTD.clone().requires_grad_(True)
    with replace_residual(model, layer, h_full):
        full_BTV = model(**kw).logits
    h_skip = h_BTD.clone().requires_grad_(True)
    calls = []
    blocks = decoder_layers(model)
    handles = [b.register_forward_pre_hook(lambda *_, i=i: calls.append(i)) for i, b in enumerate(blocks)]
    with run_from(model, layer, h_skip):
        skip_BTV = model(**kw).logits
    for h in handles:
        h.remove()

    assert torch.equal(skip_BTV, full_BTV), (skip_BTV - full_BTV).abs().max()
    (g_full,) = torch.autograd.grad(full_BTV.square().sum(), h_full)
    (g_skip,) = torch.autograd.grad(skip_BTV.square().sum(), h_skip)
    assert torch.equal(g_skip, g_full) and g_full.abs().max() > 0
    assert calls == list(range(L))  # every block is called (the loop is the model's) ...
    assert all("forward" not in vars(b) for b in decoder_layers(model))  # ... and restored afterwards


def test_run_from_skips_the_lower_blocks_compute() -> None:
    model = ARCHITECTURES["llama"]().eval()
    ids_BT, mask_BT, pos_BT = _inputs()
    ran = []
    for i, block in enumerate(decoder_layers(model)):
        block.self_attn.register_forward_hook(lambda *_, i=i: ran.append(i))
    h_BTD = torch.zeros(2, 9, D)
    with torch.no_grad(), run_from(model, 2, h_BTD):
        model(input_ids=ids_BT, attention_mask=mask_BT, position_ids=pos_BT, use_cache=False)
    assert ran == [3]  # attention ran in block 3 only
    with pytest.raises(ValueError, match="out of range"), run_from(model, L, h_BTD):
        pass


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_residual_at_stops_after_the_layer(arch: str) -> None:
    """`residual_at` gives exactly what a full forward's read hook sees, and no block above the layer runs."""
    torch.manual_seed(1)
    model = ARCHITECTURES[arch]().eval()
    ids_BT, mask_BT, pos_BT = _inputs()
    kw = {"input_ids": ids_BT, "attention_mask": mask_BT, "position_ids": pos_BT}
    with torch.no_grad(), read_residual(model, 1) as cap:
        model(**kw, use_cache=False)
    ran: list[int] = []
    handles = [b.register_forward_pre_hook(lambda *_, i=i: ran.append(i)) for i, b in enumerate(decoder_layers(model))]
    with torch.no_grad():
        h_BTD = residual_at(model, 1, **kw)
    for h in handles:
        h.remove()
    assert torch.equal(h_BTD, cap.value)
    assert ran == [0, 1]
    assert all(not b._forward_hooks for b in decoder_layers(model))  # the stopping hook is gone

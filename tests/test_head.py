"""diffsae.head: logits from the final hidden state a chunk of positions at a time equal the model's own, on seven
architectures (Gemma-2's final-logit soft-capping included); the KL and its gradient equal the unchunked reference;
no more than `chunk_elems` logits entries ever exist at once."""

from __future__ import annotations

import pytest
import torch

from diffsae import head as H
from diffsae.kl import kl_per_token
from tests.test_hooks import ARCHITECTURES, _inputs


def _pair(arch: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    a = ARCHITECTURES[arch]().eval()
    torch.manual_seed(1)
    b = ARCHITECTURES[arch]().eval()
    return a, b


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_kl_from_hidden_equals_the_full_logits_kl(arch: str) -> None:
    ft, base = _pair(arch)
    ids_BT, mask_BT, pos_BT = _inputs()
    kw = {"input_ids": ids_BT, "attention_mask": mask_BT}
    if arch == "gemma2":
        assert H._softcap(ft) is not None  # the soft-capped head is exercised
    with torch.no_grad():
        want_BT = kl_per_token(ft(**kw).logits, base(**kw).logits)
        x_ft, x_base = H.final_hidden(ft, **kw), H.final_hidden(base, **kw)
        torch.testing.assert_close(H.head_logits(ft, x_ft), ft(**kw).logits, rtol=0, atol=0)
        for chunk in (H.DEFAULT_CHUNK_ELEMS, 1, 3 * 50):  # one chunk, a position at a time, uneven chunks
            torch.testing.assert_close(H.kl_from_hidden(ft, x_ft, base, x_base, chunk), want_BT, rtol=1e-5, atol=1e-6)


def test_kl_grad_hidden_equals_autograd() -> None:
    ft, _ = _pair("gemma2")  # soft-capped: the head's backward includes the tanh
    ids_BT, mask_BT, _ = _inputs()
    with torch.no_grad():
        x_p = H.final_hidden(ft, input_ids=ids_BT, attention_mask=mask_BT)
    x_q = (x_p + 0.3 * torch.randn_like(x_p)).requires_grad_(True)
    w_BT = (torch.rand(x_p.shape[:2]) > 0.3).float()
    loss = (kl_per_token(H.head_logits(ft, x_p), H.head_logits(ft, x_q)) * w_BT).sum()
    (want,) = torch.autograd.grad(loss, x_q)
    for chunk in (H.DEFAULT_CHUNK_ELEMS, 1, 7 * 50):
        got = H.kl_grad_hidden(ft, x_p, x_q.detach()[None], w_BT, chunk)[0]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_at_most_chunk_elems_logits_exist_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every head call the KL and its gradient make is at most `chunk_elems` entries (at least one position)."""
    ft, base = _pair("llama")
    ids_BT, mask_BT, _ = _inputs()
    B, T = ids_BT.shape
    V = ft.get_output_embeddings().weight.shape[0]
    with torch.no_grad():
        x_ft = H.final_hidden(ft, input_ids=ids_BT, attention_mask=mask_BT)
        x_base = H.final_hidden(base, input_ids=ids_BT, attention_mask=mask_BT)
    sizes: list[int] = []
    real = H.head_logits
    monkeypatch.setattr(H, "head_logits", lambda m, x: sizes.append(x[..., 0].numel() * V) or real(m, x))
    budget = 2 * B * V  # two positions of every row
    H.kl_from_hidden(ft, x_ft, base, x_base, chunk_elems=budget)
    H.kl_grad_hidden(ft, x_ft, x_base[None], torch.ones(B, T), chunk_elems=budget)
    assert sizes and max(sizes) <= budget
    assert len(sizes) == 2 * 2 * ((T + 1) // 2)  # p and q per chunk (2 positions of each row, or 2B gathered ones)


def test_a_head_that_is_not_the_models_logits_is_refused() -> None:
    """A model that does more after its head than soft-capping (here: a logit scale) is refused, not diffed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    class Scaled(LlamaForCausalLM):
        def forward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 0.5
            return out

    torch.manual_seed(0)
    model = Scaled(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=2)).eval()  # fmt: skip
    with pytest.raises(ValueError, match="Scaled: logits are not head"):
        H.final_hidden(model, input_ids=torch.tensor([[1, 2, 3]]))

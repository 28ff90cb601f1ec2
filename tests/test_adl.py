"""The activation-difference lens (diffsae/adl.py): the pooled mean by hand, the logit lens on a tiny Llama."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from diffsae.adl import adl_direction, adl_tokens


def test_mean_over_the_first_positions_by_hand() -> None:
    """Positions 1..2 of each document (BOS skipped; the short document gives its one position)."""
    a = torch.tensor([[100.0, 100.0], [1.0, 2.0], [3.0, 4.0], [50.0, 50.0]])
    b = torch.tensor([[100.0, 100.0], [5.0, 0.0]])
    got = adl_direction([a, b], first=2)
    torch.testing.assert_close(got, torch.tensor([(1 + 3 + 5) / 3, (2 + 4 + 0) / 3]))
    torch.testing.assert_close(adl_direction([a], first=1, skip_first=0), torch.tensor([100.0, 100.0]))


def test_bad_arguments_are_one_line() -> None:
    with pytest.raises(ValueError, match=r"^adl first must be >= 1, got 0$"):
        adl_direction([torch.zeros(3, 2)], first=0)
    with pytest.raises(ValueError, match=r"^no document has a position in \[1, 3\)$"):
        adl_direction([torch.zeros(1, 2)], first=2)


class Vocab:
    def decode(self, ids: list[int]) -> str:
        return f"<{ids[0]}>"


def test_logit_lens_reads_the_unembedding() -> None:
    """W_U rows e_0 .. e_7 (d = 8, vocabulary 8), final norm gain 2 on dimension 5: δ = e_5 − 0.5 e_2 raises token 5
    most and lowers token 2 most."""
    cfg = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.eye(8))
        model.model.norm.weight.fill_(1.0)
        model.model.norm.weight[5] = 2.0
    delta = torch.zeros(8)
    delta[5], delta[2], delta[1] = 1.0, -0.5, 0.3
    promoted, suppressed = adl_tokens(delta, model, Vocab(), top_n=2)
    assert promoted == ["<5>", "<1>"] and suppressed[0] == "<2>"

"""The output head in chunks: per-token KL and its gradient without ever holding [B, T, V] logits.

Why: a model's forward returns logits for every position at once, [B, T, V] float32. With Gemma-3's 262,144-token
vocabulary that is 1 MiB per token: 4 GiB for a 4,096-token extraction batch per model, several times that in the
attribution's stacked α steps. Here the model runs with its output head (`get_output_embeddings()`) replaced by one
that records its input, the final hidden state x [B, T, D], and returns nothing; logits are then made from x a chunk
of positions at a time (`head_logits`: the head, then Gemma's final-logit soft-capping when the config has one), so
at most `chunk_elems` logits entries exist at once.

`check_head` verifies, once per model, on a few tokens, that these logits are the model's own (an architecture that
does more after its head than soft-capping is refused with one line rather than diffed wrongly).

    x_ft_BTD = final_hidden(ft, input_ids=ids_BT, attention_mask=mask_BT)
    x_base_BTD = final_hidden(base, input_ids=ids_BT, attention_mask=mask_BT)
    kl_BT = kl_from_hidden(ft, x_ft_BTD, base, x_base_BTD)  # KL(p_ft ‖ p_base) per token
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from diffsae.kl import DEFAULT_CHUNK_ELEMS, kl_chunk

_CHECKED: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def _head(model: nn.Module) -> nn.Module:
    head = model.get_output_embeddings()  # type: ignore[operator]
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output head")
    return head


def _softcap(model: nn.Module) -> float | None:
    cfg = model.config  # type: ignore[attr-defined]
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return getattr(cfg, "final_logit_softcapping", None)


def head_logits(model: nn.Module, x_BTD: torch.Tensor) -> torch.Tensor:
    """The model's logits from its final hidden states (any leading dims): the head, then soft-capping if any."""
    logits = _head(model)(x_BTD)
    cap = _softcap(model)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


@contextmanager
def _recording_head(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Replace the head's forward: record its input, return empty logits [..., 0] (an instance attribute, removed
    on exit)."""
    head, seen = _head(model), []

    def forward(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        seen.append(x)
        return x[..., :0]

    head.forward = forward  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        del head.forward


def final_hidden(model: nn.Module, **inputs: Any) -> torch.Tensor:
    """The input of the model's output head, x [B, T, D], from one forward (`inputs`: input_ids, attention_mask,
    position_ids...; no KV cache). Keeps the autograd graph when called with gradients enabled."""
    check_head(model)
    with _recording_head(model) as seen:
        model(**inputs, use_cache=False)
    if len(seen) != 1:
        raise ValueError(f"{type(model).__name__}: the output head ran {len(seen)} times in one forward")
    return seen[0]


@torch.no_grad()
def check_head(model: nn.Module, n_tokens: int = 6) -> None:
    """Once per model: `head_logits(final_hidden(...))` equals the model's own logits on a few tokens."""
    if _CHECKED.get(model):
        return
    _CHECKED[model] = True  # set first: final_hidden below calls back here
    device = next(model.parameters()).device
    vocab = int(_head(model).weight.shape[0])  # type: ignore[union-attr]
    ids_BT = torch.arange(1, n_tokens + 1, device=device)[None] % vocab
    try:
        want = model(input_ids=ids_BT, use_cache=False).logits.float()  # type: ignore[operator]
        got = head_logits(model, final_hidden(model, input_ids=ids_BT)).float()
    except BaseException:
        del _CHECKED[model]
        raise
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max())):
        del _CHECKED[model]
        raise ValueError(f"{type(model).__name__}: logits are not head(final hidden state); not supported")


def _position_chunk(x_BTD: torch.Tensor, vocab: int, chunk_elems: int) -> int:
    rows = max(1, x_BTD[..., 0, 0].numel())  # product of the leading dims
    return max(1, chunk_elems // max(1, rows * vocab))


def kl_from_hidden(
    model_p: nn.Module,
    x_p_BTD: torch.Tensor,
    model_q: nn.Module,
    x_q_BTD: torch.Tensor,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> torch.Tensor:
    """KL(p ‖ q) per position, float32 [..., T], with p = softmax(head_p(x_p)), q = softmax(head_q(x_q)); the two
    leading shapes broadcast (one reference [1, B, T, D] against several runs [S, B, T, D])."""
    lead = torch.broadcast_shapes(x_p_BTD.shape[:-1], x_q_BTD.shape[:-1])
    T, V = lead[-1], int(_head(model_p).weight.shape[0])  # type: ignore[union-attr]
    t_chunk = _position_chunk(torch.empty(lead + (1,), device="meta"), V, chunk_elems)
    parts = []
    for t0 in range(0, T, t_chunk):
        sl = slice(t0, t0 + t_chunk)
        parts.append(kl_chunk(head_logits(model_p, x_p_BTD[..., sl, :]), head_logits(model_q, x_q_BTD[..., sl, :])))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def kl_grad_hidden(
    model: nn.Module,
    x_p_BTD: torch.Tensor,
    x_q_CBTD: torch.Tensor,
    weight_BT: torch.Tensor,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> torch.Tensor:
    """∂/∂x_q of Σ_{c,b,t} weight_bt · KL(p_bt ‖ q_cbt), with p = softmax(head(x_p)) (one reference [B, T, D], the
    same for every run c) and q = softmax(head(x_q)) ([C, B, T, D]: C runs of the batch).

    Only positions with a non-zero weight make logits: they are gathered ([C, N, D], N = weighted positions) and,
    a chunk of them at a time, the closed form weight · (q − p) on the logits goes back through the head alone;
    every other position's gradient is exactly 0. Returns [C, B, T, D] like x_q; the caller backpropagates it
    through the layers below the head."""
    C, B, T, D = x_q_CBTD.shape
    V = int(_head(model).weight.shape[0])  # type: ignore[union-attr]
    grad_CBTD = torch.zeros_like(x_q_CBTD)
    b_N, t_N = weight_BT.nonzero(as_tuple=True)  # [N] the weighted positions, row-major
    w_N = weight_BT[b_N, t_N].float()  # [N]
    n_chunk = max(1, chunk_elems // max(1, C * V))
    for n0 in range(0, b_N.numel(), n_chunk):
        b_n, t_n = b_N[n0 : n0 + n_chunk], t_N[n0 : n0 + n_chunk]
        with torch.no_grad():
            p_nV = torch.softmax(head_logits(model, x_p_BTD[b_n, t_n]).float(), dim=-1)  # [n, V]
        x_leaf = x_q_CBTD[:, b_n, t_n].detach().requires_grad_(True)  # [C, n, D]
        with torch.enable_grad():
            logits_q = head_logits(model, x_leaf)  # [C, n, V]
        with torch.no_grad():
            dlogits = (torch.softmax(logits_q.float(), dim=-1) - p_nV) * w_N[n0 : n0 + n_chunk, None]
        (g_CnD,) = torch.autograd.grad(logits_q, x_leaf, grad_outputs=dlogits.to(logits_q.dtype))
        grad_CBTD[:, b_n, t_n] = g_CnD
    return grad_CBTD

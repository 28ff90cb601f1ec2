"""The attribution path before 2026-11-30, for the benches that time old against new in one run.

`full`: every patched pass runs the whole model with the output of block L replaced by a hook (before
`diffsae.hooks.run_from`), and the head's KL gradient is made at every position, weighted or not (before the
sparse `diffsae.head.kl_grad_hidden`). `upper`: today's path. `use_path` swaps the two in the modules that call
them; the rest of `diffsae.attribution` (rule, points, selection) is unchanged.
"""

from __future__ import annotations

import torch

import diffsae.attribution as attribution_module
import diffsae.patching as patching_module
from diffsae.head import final_hidden, head_logits
from diffsae.hooks import replace_residual
from diffsae.kl import DEFAULT_CHUNK_ELEMS

UPPER = patching_module.patched_hidden
SPARSE_GRAD = attribution_module.kl_grad_hidden
PATHS = ("full", "upper")


def full_patched_hidden(model, layer, h_BTD, ids_BT, mask_BT, pos_BT):  # type: ignore[no-untyped-def]
    """The pre-run_from path: the whole model runs, the output of block `layer` replaced by a hook."""
    with replace_residual(model, layer, h_BTD):
        return final_hidden(model, input_ids=ids_BT, attention_mask=mask_BT, position_ids=pos_BT)


def dense_kl_grad_hidden(model, x_p_BTD, x_q_CBTD, weight_BT, chunk_elems=DEFAULT_CHUNK_ELEMS):  # type: ignore[no-untyped-def]
    """The pre-2026-12-01 head gradient: logits and their closed-form gradient at EVERY position (weight 0 or not),
    a chunk of positions at a time."""
    grad_CBTD = torch.zeros_like(x_q_CBTD)
    T, V = x_q_CBTD.shape[-2], int(model.get_output_embeddings().weight.shape[0])
    t_chunk = max(1, chunk_elems // max(1, x_q_CBTD[..., 0, 0].numel() * V))
    for t0 in range(0, T, t_chunk):
        sl = slice(t0, t0 + t_chunk)
        with torch.no_grad():
            p = torch.softmax(head_logits(model, x_p_BTD[None, :, sl]).float(), dim=-1)
        x_leaf = x_q_CBTD[..., sl, :].detach().requires_grad_(True)
        with torch.enable_grad():
            logits_q = head_logits(model, x_leaf)
        with torch.no_grad():
            dlogits = (torch.softmax(logits_q.float(), dim=-1) - p) * weight_BT[None, :, sl, None].float()
        (grad_CBTD[..., sl, :],) = torch.autograd.grad(logits_q, x_leaf, grad_outputs=dlogits.to(logits_q.dtype))
    return grad_CBTD


def use_path(name: str) -> None:
    """`full`: the path before 2026-11-30 (whole model, dense head gradient); `upper`: today's."""
    if name not in PATHS:
        raise ValueError(f"path {name!r}: one of {PATHS}")
    fn = UPPER if name == "upper" else full_patched_hidden
    patching_module.patched_hidden = fn  # type: ignore[assignment]
    attribution_module.patched_hidden = fn  # type: ignore[assignment]
    attribution_module.kl_grad_hidden = SPARSE_GRAD if name == "upper" else dense_kl_grad_hidden  # type: ignore

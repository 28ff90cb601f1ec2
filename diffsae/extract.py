"""Paired forward passes: per-token activation differences and KL(finetuned ‖ base), batch by batch.

Stage 1's compute, free of storage: both models read the same token ids (batched by a token budget, padding
masked), the residual stream at layer L is read with a hook, and every real (non-padding) token yields one row:

    doc_id, pos, token_id, role, kl, in_sae, diff (= h_ft - h_base) [, base, ft when save_raw] [, states]

`states` (save_states): h_base, h_ft and the finetuned final hidden state x_ft in float32 (`States`), what the
attribution stage would otherwise recompute with an unpatched forward of both models (diffsae/patching.py).

`kl` = KL(p_ft,t ‖ p_base,t) of the next-token distributions at position t (float32 log-softmax, natural log).
`in_sae` is False for the first `skip_first` positions (the BOS / attention-sink token), which stay in the tokens
table but not in the SAE's data. On CUDA the models run under autocast, results are copied into pinned host
memory without blocking, and the caller overlaps writing with the next batch (see storage/activations.py).

    for batch in extract_docs(base, ft, layer=2, docs=docs, batch_tokens=4096, device=dev):
        ...
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch import nn

from diffsae.data import Doc
from diffsae.head import final_hidden, kl_from_hidden
from diffsae.hooks import read_residual


class States(NamedTuple):
    """What extraction computed of the unpatched runs (`extract.save_states`), float32, laid out like the batch:
    with them (and extraction's KL) the attribution runs neither model's unpatched forward again."""

    h_base_BTD: torch.Tensor  # the base model's residual at the output of block `layer`
    h_ft_BTD: torch.Tensor  # the finetuned model's residual there
    x_ft_BTD: torch.Tensor  # the finetuned model's final hidden state (the head's input)


class ExtractBatch(NamedTuple):
    doc_id_N: np.ndarray  # int64
    pos_N: np.ndarray  # int32
    token_id_N: np.ndarray  # int32
    role_N: list[str]
    kl_N: np.ndarray  # float32
    in_sae_N: np.ndarray  # bool
    diff_ND: np.ndarray  # storage dtype
    base_ND: np.ndarray | None
    ft_ND: np.ndarray | None
    states_N3D: np.ndarray | None = None  # float32 [N, 3, D]: States' h_base, h_ft, x_ft rows (save_states)

    @property
    def n_tokens(self) -> int:
        return int(self.pos_N.shape[0])


def plan_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Group document indices into batches whose padded size (n_docs × longest) fits `batch_tokens`.

    Documents are sorted by length first, so padding stays small; a document longer than the budget is a batch
    of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    cur_max = 0
    for i in order:
        new_max = max(cur_max, lengths[i])
        if cur and new_max * (len(cur) + 1) > batch_tokens:
            batches.append(cur)
            cur, new_max = [], lengths[i]
        cur.append(i)
        cur_max = new_max
    if cur:
        batches.append(cur)
    return batches


def pad_batch(docs: Sequence[Doc], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids [B, T] and attention mask [B, T]."""
    T = max(len(d.token_ids) for d in docs)
    ids_BT = torch.full((len(docs), T), pad_id, dtype=torch.long)
    mask_BT = torch.zeros((len(docs), T), dtype=torch.long)
    for b, d in enumerate(docs):
        ids_BT[b, : len(d.token_ids)] = torch.tensor(d.token_ids, dtype=torch.long)
        mask_BT[b, : len(d.token_ids)] = 1
    return ids_BT.to(device, non_blocking=True), mask_BT.to(device, non_blocking=True)


def _autocast(device: torch.device, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    enabled = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


@torch.no_grad()
def paired_forward(
    base: nn.Module,
    ft: nn.Module,
    layer: int,
    ids_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    dtype: torch.dtype,
) -> tuple[States, torch.Tensor]:
    """Both models on the same batch: States (h_base, h_ft [B,T,D] float32, x_ft [B,T,D]) and kl [B,T] float32, on
    the device. The KL is made from the final hidden states a chunk of positions at a time (diffsae.head: no
    [B, T, V])."""
    with _autocast(ids_BT.device, dtype):
        with read_residual(base, layer) as cap_b:
            x_base_BTD = final_hidden(base, input_ids=ids_BT, attention_mask=mask_BT)
        with read_residual(ft, layer) as cap_f:
            x_ft_BTD = final_hidden(ft, input_ids=ids_BT, attention_mask=mask_BT)
        kl_BT = kl_from_hidden(ft, x_ft_BTD, base, x_base_BTD)  # KL(p_ft ‖ p_base), float32
    assert cap_b.value is not None and cap_f.value is not None
    return States(cap_b.value.float(), cap_f.value.float(), x_ft_BTD), kl_BT


def extract_docs(
    base: nn.Module,
    ft: nn.Module,
    layer: int,
    docs: Sequence[Doc],
    batch_tokens: int,
    device: torch.device,
    model_dtype: torch.dtype = torch.float32,
    store_dtype: str = "float16",
    skip_first: int = 1,
    save_raw: bool = False,
    pad_id: int = 0,
    save_states: bool = False,
) -> Iterator[ExtractBatch]:
    """Yield one ExtractBatch per forward batch; rows are the real tokens of the batch's documents."""
    np_dtype = np.float16 if store_dtype == "float16" else np.float32
    t_dtype = torch.float16 if store_dtype == "float16" else torch.float32
    pin = device.type == "cuda"
    for idx in plan_batches([len(d.token_ids) for d in docs], batch_tokens):
        bdocs = [docs[i] for i in idx]
        ids_BT, mask_BT = pad_batch(bdocs, pad_id, device)
        states, kl_BT = paired_forward(base, ft, layer, ids_BT, mask_BT, model_dtype)
        h_base_BTD, h_ft_BTD = states.h_base_BTD, states.h_ft_BTD
        real_BT = mask_BT.bool()
        diff_ND = (h_ft_BTD - h_base_BTD)[real_BT].to(t_dtype)  # [N, D], padding dropped
        out = [diff_ND, kl_BT[real_BT]]
        if save_raw:
            out += [h_base_BTD[real_BT].to(t_dtype), h_ft_BTD[real_BT].to(t_dtype)]
        if save_states:
            out.append(torch.stack([h_base_BTD[real_BT], h_ft_BTD[real_BT], states.x_ft_BTD[real_BT].float()], 1))
        if pin:
            host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in out]
            for h, t in zip(host, out):
                h.copy_(t, non_blocking=True)
            torch.cuda.current_stream(device).synchronize()
            out = host
        arrays = [t.cpu().numpy() for t in out]
        doc_id_N = np.concatenate([np.full(len(d.token_ids), d.doc_id, np.int64) for d in bdocs])
        pos_N = np.concatenate([np.arange(len(d.token_ids), dtype=np.int32) for d in bdocs])
        yield ExtractBatch(
            doc_id_N=doc_id_N,
            pos_N=pos_N,
            token_id_N=np.concatenate([np.asarray(d.token_ids, np.int32) for d in bdocs]),
            role_N=[r for d in bdocs for r in d.roles],
            kl_N=arrays[1].astype(np.float32),
            in_sae_N=pos_N >= skip_first,
            diff_ND=arrays[0].astype(np_dtype, copy=False),
            base_ND=arrays[2].astype(np_dtype, copy=False) if save_raw else None,
            ft_ND=arrays[3].astype(np_dtype, copy=False) if save_raw else None,
            states_N3D=arrays[-1] if save_states else None,
        )

"""Read or replace the residual stream of a transformers causal LM at one layer.

`layer: L` means the residual stream at the OUTPUT of decoder block L (0-indexed). For L < n_layers - 1 this equals
`outputs.hidden_states[L + 1]` of transformers (the last entry of hidden_states has the final norm applied in most
architectures, the hook does not).

    with read_residual(model, 2) as cap:
        model(input_ids)
    acts_BTD = cap.value

    with replace_residual(model, 2, h_BTD):        # or a function acts_BTD -> new acts_BTD
        logits = model(input_ids).logits

    with run_from(model, 2, h_BTD):                # the same logits, without computing blocks 0..2
        logits = model(input_ids, use_cache=False).logits

    h_BTD = residual_at(model, 2, input_ids=ids)   # blocks 0..2 only: the forward stops there

Hooks are removed in `finally`, also when the forward pass raises.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a transformers causal LM (Llama, Gemma, Mistral, Qwen, GPT-NeoX, GPT-2...)."""
    for path in (
        "model.layers",
        "model.model.layers",
        "transformer.h",
        "gpt_neox.layers",
        "model.decoder.layers",
    ):
        obj: object = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def n_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


class Captured:
    """Holder of the activation seen by a read hook: `value` is [batch, seq, d_model]."""

    value: torch.Tensor | None = None


def _hidden(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output  # type: ignore[index,return-value]


def _with_hidden(output: object, new: torch.Tensor) -> object:
    if isinstance(output, tuple):
        return (new,) + tuple(output[1:])
    return new


@contextmanager
def read_residual(model: nn.Module, layer: int, detach: bool = True) -> Iterator[Captured]:
    """Capture the output of decoder block `layer` on every forward pass inside the block."""
    cap = Captured()

    def hook(_mod: nn.Module, _inp: object, output: object) -> None:
        h_BTD = _hidden(output)
        cap.value = h_BTD.detach() if detach else h_BTD

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield cap
    finally:
        handle.remove()


class _StopForward(Exception):
    """Raised by `residual_at`'s hook once block `layer` has run: the rest of the forward is not needed."""


def residual_at(model: nn.Module, layer: int, **inputs: object) -> torch.Tensor:
    """The output of decoder block `layer` (detached) from a forward that stops there: the blocks above it, the
    final norm and the head never run (`inputs`: input_ids, attention_mask, position_ids...)."""
    cap = Captured()

    def hook(_mod: nn.Module, _inp: object, output: object) -> None:
        cap.value = _hidden(output).detach()
        raise _StopForward

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        model(**inputs, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if cap.value is None:
        raise RuntimeError(f"{type(model).__name__}: decoder block {layer} never ran")
    return cap.value


@contextmanager
def run_from(model: nn.Module, layer: int, h_BTD: torch.Tensor) -> Iterator[None]:
    """Skip decoder blocks 0..`layer`: block `layer` outputs `h_BTD` at once, the blocks below it pass their input
    through, so only the blocks above `layer` (and the model's embedding, masks, rotary tables and head) compute.
    Equal to `replace_residual(model, layer, h_BTD)` when nothing else reads the skipped blocks (run it with
    use_cache=False, so no KV cache expects them). Works for every model whose decoder loop feeds each block's
    output to the next (Llama, Gemma-2/3, Qwen2, Mistral, GPT-NeoX, GPT-2, ...), whichever masks and position
    embeddings they pass."""
    blocks = decoder_layers(model)
    if not 0 <= layer < len(blocks):
        raise ValueError(f"layer {layer} out of range: the model has {len(blocks)} decoder blocks")

    def skipped(i: int) -> Callable[..., torch.Tensor]:
        def forward(hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
            if i < layer:
                return hidden_states
            if h_BTD.shape != hidden_states.shape:
                raise ValueError(f"replacement shape {tuple(h_BTD.shape)} != activation shape "
                                 f"{tuple(hidden_states.shape)}")  # fmt: skip
            return h_BTD.to(hidden_states.dtype)

        return forward

    for i in range(layer + 1):
        blocks[i].forward = skipped(i)  # an instance attribute: nn.Module.__call__ finds it first
    try:
        yield
    finally:
        for i in range(layer + 1):
            del blocks[i].forward


@contextmanager
def replace_residual(
    model: nn.Module, layer: int, new: torch.Tensor | Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[None]:
    """Replace the output of decoder block `layer` by `new` (a [B, T, D] tensor or a function of the original)."""

    def hook(_mod: nn.Module, _inp: object, output: object) -> object:
        h_BTD = _hidden(output)
        repl_BTD = new(h_BTD) if callable(new) else new
        if repl_BTD.shape != h_BTD.shape:
            raise ValueError(f"replacement shape {tuple(repl_BTD.shape)} != activation shape {tuple(h_BTD.shape)}")
        return _with_hidden(output, repl_BTD.to(h_BTD.dtype))

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()

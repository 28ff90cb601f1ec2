"""Load and validate the (base, finetuned) model pair.

Why: every later stage (extraction, KL, attribution) assumes the two models share a tokenizer, a width and a layer
count, and that `layer` exists. These are checked here, from configs and tokenizers, BEFORE any weights are loaded,
and each failure is one clear line (`PairError`).

    from diffsae.config import ModelsConfig
    pair = load_pair(ModelsConfig(base="out/base", finetuned="out/finetuned", layer=2), needs_chat_template=True)
    with read_residual(pair.finetuned, 2) as cap:
        pair.finetuned(ids_BT.to(pair.device))

Each side may be a hub id, an HF folder, a `.gguf` file or (finetuned) a LoRA adapter folder: `diffsae.sources`
turns it into a folder first. `model_fingerprint` (diffsae.fingerprint) names the content that was loaded.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from diffsae.config import ModelsConfig
from diffsae.fingerprint import PairError, model_fingerprint
from diffsae.hooks import n_layers, read_residual, replace_residual
from diffsae.sources import resolve_models

__all__ = [
    "ModelPair",
    "PairError",
    "load_pair",
    "model_fingerprint",
    "read_residual",
    "replace_residual",
    "resolve_device",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SPECIAL_ATTRS = ("bos_token", "eos_token", "pad_token", "unk_token")


class ModelPair(NamedTuple):
    base: PreTrainedModel
    finetuned: PreTrainedModel
    tokenizer: Any  # the finetuned model's tokenizer (identical vocab to the base one, checked)
    device: torch.device
    base_fingerprint: str
    finetuned_fingerprint: str


def resolve_device(spec: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; otherwise the named device (checked to exist)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PairError(f"device {spec!r} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise PairError(f"device {spec!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise PairError(f"device {spec!r} requested but MPS is not available")
    return dev


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _load_config(src: str, which: str, revision: str | None) -> Any:
    try:
        return AutoConfig.from_pretrained(src, revision=revision)
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one line
        raise PairError(f"cannot load {which} model config from {src}: {_one_line(e)}") from None


def _load_tokenizer(src: str, which: str, revision: str | None) -> Any:
    try:
        return AutoTokenizer.from_pretrained(src, revision=revision)
    except Exception as e:  # noqa: BLE001
        raise PairError(f"cannot load {which} tokenizer from {src}: {_one_line(e)}") from None


def _text_config(cfg: Any) -> Any:
    """Multimodal configs keep the language model under `text_config`."""
    return getattr(cfg, "text_config", None) or cfg


def _check_tokenizers(tok_b: Any, tok_f: Any) -> None:
    for attr in _SPECIAL_ATTRS:
        a, b = getattr(tok_b, attr, None), getattr(tok_f, attr, None)
        if str(a) != str(b):
            raise PairError(f"tokenizers differ: {attr} is {a!r} in base but {b!r} in finetuned")
    sa, sb = sorted(tok_b.all_special_tokens), sorted(tok_f.all_special_tokens)
    if sa != sb:
        only = sorted(set(sa) ^ set(sb))[:3]
        raise PairError(f"tokenizers differ: special tokens differ ({', '.join(map(repr, only))})")
    va, vb = tok_b.get_vocab(), tok_f.get_vocab()
    if len(va) != len(vb):
        raise PairError(f"tokenizers differ: vocab size {len(va)} (base) vs {len(vb)} (finetuned)")
    if va != vb:
        diff = sorted(set(va.items()) ^ set(vb.items()), key=lambda kv: kv[1])
        tok, idx = diff[0]
        raise PairError(f"tokenizers differ: {len(diff) // 2 or 1} vocab entries differ (e.g. {tok!r} -> {idx})")


def _check_shapes(cfg_b: Any, cfg_f: Any, layer: int) -> None:
    tb, tf = _text_config(cfg_b), _text_config(cfg_f)
    hb, hf = getattr(tb, "hidden_size", None), getattr(tf, "hidden_size", None)
    if hb != hf:
        raise PairError(f"hidden sizes differ: base {hb} vs finetuned {hf}")
    lb, lf = getattr(tb, "num_hidden_layers", None), getattr(tf, "num_hidden_layers", None)
    if lb != lf:
        raise PairError(f"layer counts differ: base {lb} vs finetuned {lf}")
    if lb is not None and not 0 <= layer < lb:
        raise PairError(f"layer {layer} out of range: the models have {lb} layers (valid: 0..{lb - 1})")


def check_pair(models_cfg: ModelsConfig, needs_chat_template: bool) -> Any:
    """Every check that needs no weights (configs and tokenizers only); returns the finetuned tokenizer."""
    rev = models_cfg.revision
    resolved = resolve_models(models_cfg)
    src_b, src_f = resolved.base, resolved.finetuned
    assert src_b is not None and src_f is not None
    cfg_b = _load_config(src_b, "base", rev)
    cfg_f = _load_config(src_f, "finetuned", rev)
    _check_shapes(cfg_b, cfg_f, models_cfg.layer)
    tok_b = _load_tokenizer(src_b, "base", rev)
    tok_f = _load_tokenizer(src_f, "finetuned", rev)
    _check_tokenizers(tok_b, tok_f)
    if needs_chat_template and not getattr(tok_f, "chat_template", None):
        raise PairError(f"the data has `messages` but the finetuned tokenizer has no chat template: {src_f}")
    return tok_f


def load_pair(models_cfg: ModelsConfig, needs_chat_template: bool) -> ModelPair:
    """Validate, then load both models (eval mode, no grads) and the finetuned tokenizer."""
    device = resolve_device(models_cfg.device)
    rev = models_cfg.revision
    resolved = resolve_models(models_cfg)
    src_b, src_f = resolved.base, resolved.finetuned
    assert src_b is not None and src_f is not None
    tok_f = check_pair(models_cfg, needs_chat_template)

    dtype = _DTYPES[models_cfg.dtype]
    models = []
    for src, which in ((src_b, "base"), (src_f, "finetuned")):
        try:
            model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, revision=rev)
        except Exception as e:  # noqa: BLE001
            raise PairError(f"cannot load {which} model from {src}: {_one_line(e)}") from None
        try:
            count = n_layers(model)
        except ValueError as e:
            raise PairError(f"{which} model: {e}") from None
        if not 0 <= models_cfg.layer < count:
            raise PairError(f"layer {models_cfg.layer} out of range: {which} model has {count} decoder blocks")
        model.eval().requires_grad_(False)
        models.append(model.to(device))
    return ModelPair(
        base=models[0],
        finetuned=models[1],
        tokenizer=tok_f,
        device=device,
        base_fingerprint=model_fingerprint(src_b, rev),
        finetuned_fingerprint=model_fingerprint(src_f, rev),
    )

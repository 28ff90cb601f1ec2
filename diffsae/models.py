"""Load and validate the (base, finetuned) model pair.

Why: every later stage (extraction, KL, attribution) assumes the two models share a tokenizer, a width and a layer
count, and that `layer` exists. These are checked here, from configs and tokenizers, BEFORE any weights are loaded,
and each failure is one clear line (`PairError`).

    from diffsae.config import ModelsConfig
    pair = load_pair(ModelsConfig(base="out/base", finetuned="out/finetuned", layer=2), needs_chat_template=True)
    with read_residual(pair.finetuned, 2) as cap:
        pair.finetuned(ids_BT.to(pair.device))

`model_fingerprint(path_or_id)` is a sha256 over config, tokenizer and weight files; per-file digests of big files
are memoised in `~/.cache/diffsae/file_hashes.json` (or `$DIFFSAE_CACHE_DIR`) keyed by (abspath, size, mtime_ns).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from diffsae.config import ModelsConfig, local_cache_dir
from diffsae.hooks import n_layers, read_residual, replace_residual

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
_FINGERPRINT_NAMES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json", ".pt", ".pth")
_MEMO_MIN_BYTES = 1 << 20


class PairError(ValueError):
    """The model pair cannot be diffed; the message is one line."""


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


def _is_local_spec(spec: str) -> bool:
    """A spec that can only be a local path (a hub id is `name` or `org/name`)."""
    return (
        spec.startswith(("/", ".", "~"))
        or spec.count("/") > 1
        or os.sep != "/"
        and os.sep in spec
        or Path(spec).expanduser().exists()
    )


def _source(spec: str, which: str) -> str:
    """The local folder of a model, or the hub id unchanged; PairError when a local path does not exist."""
    p = Path(spec).expanduser()
    if p.is_dir():
        return str(p.resolve())
    if p.exists():
        raise PairError(f"{which} model path is not a folder: {spec}")
    if _is_local_spec(spec):
        raise PairError(f"{which} model path not found: {spec}")
    return spec


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
    src_b = _source(models_cfg.base, "base")
    src_f = _source(models_cfg.finetuned, "finetuned")
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
    src_b = _source(models_cfg.base, "base")
    src_f = _source(models_cfg.finetuned, "finetuned")
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


# ----------------------------------------------------------------------------------------------- fingerprints


def _memo_path() -> Path:
    return local_cache_dir() / "file_hashes.json"


def _read_memo() -> dict[str, str]:
    try:
        data = json.loads(_memo_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_memo(memo: dict[str, str]) -> None:
    path = _memo_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo, indent=0, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs recomputation


def file_sha256(path: Path, memo: dict[str, str] | None = None) -> str:
    """sha256 of a file's bytes; big files are looked up in / added to `memo` by (abspath, size, mtime_ns)."""
    real = Path(os.path.realpath(path))
    st = real.stat()
    key = f"{real}|{st.st_size}|{st.st_mtime_ns}"
    if memo is not None and key in memo:
        return memo[key]
    h = hashlib.sha256()
    with open(real, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()
    if memo is not None and st.st_size >= _MEMO_MIN_BYTES:
        memo[key] = digest
    return digest


def _fingerprint_files(folder: Path) -> list[Path]:
    files = [p for p in sorted(folder.iterdir()) if p.is_file()]
    return [p for p in files if p.name in _FINGERPRINT_NAMES or p.name.endswith(_WEIGHT_SUFFIXES)]


def _hub_folder(repo_id: str, revision: str | None) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or not a hub id)
        return None


def model_fingerprint(path_or_id: str, revision: str | None = None) -> str:
    """sha256 over (name, sha256) of config, tokenizer and weight files of a local folder or cached hub model."""
    folder = Path(path_or_id).expanduser()
    if not folder.is_dir():
        hub = _hub_folder(path_or_id, revision)
        if hub is None:
            raise PairError(f"cannot fingerprint {path_or_id}: not a local folder nor a cached hub model")
        folder = hub
    files = _fingerprint_files(folder)
    if not any(p.name == "config.json" for p in files):
        raise PairError(f"cannot fingerprint {path_or_id}: no config.json in {folder}")
    memo = _read_memo()
    before = dict(memo)
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}\0{file_sha256(p, memo)}\n".encode())
    if memo != before:
        _write_memo(memo)
    return h.hexdigest()

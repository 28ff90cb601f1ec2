"""diffsae.models: pair validation with real mismatched tiny models, fingerprints, devices, hook re-exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from diffsae import fingerprint
from diffsae import models as M
from diffsae.config import ModelsConfig
from organisms.demo_train import build_tokenizer

TEXT = [
    "To be, or not to be, that is the question. Whether 'tis nobler in the mind to suffer.",
    "Hello, how are you today? I am fine, thank you. What is your favourite colour?",
] * 20


def _save_model(folder: Path, tok, d_model: int = 32, n_layers: int = 2, seed: int = 0) -> Path:
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("zoo")
    tok = build_tokenizer(TEXT, 300)
    other_vocab = build_tokenizer([t.upper() for t in TEXT], 300)
    no_chat = build_tokenizer(TEXT, 300)
    no_chat.chat_template = None
    other_special = build_tokenizer(TEXT, 300)
    other_special.pad_token = "<|end|>"  # same vocab, different special token
    return {
        "base": _save_model(root / "base", tok, seed=0),
        "ft": _save_model(root / "ft", tok, seed=1),
        "wide": _save_model(root / "wide", tok, d_model=48),
        "deep": _save_model(root / "deep", tok, n_layers=3),
        "other_vocab": _save_model(root / "other_vocab", other_vocab),
        "other_special": _save_model(root / "other_special", other_special),
        "no_chat": _save_model(root / "no_chat", no_chat),
    }


def _cfg(base: Path, ft: Path, layer: int = 1) -> ModelsConfig:
    return ModelsConfig(base=str(base), finetuned=str(ft), layer=layer, device="cpu")


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFSAE_CACHE_DIR", str(tmp_path / "cache"))


def test_load_pair_ok(zoo):
    pair = M.load_pair(_cfg(zoo["base"], zoo["ft"]), needs_chat_template=True)
    assert pair.device == torch.device("cpu")
    for model in (pair.base, pair.finetuned):
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())
        assert next(model.parameters()).dtype == torch.float32
    assert pair.tokenizer.chat_template
    assert len(pair.base_fingerprint) == 64 and len(pair.finetuned_fingerprint) == 64
    assert pair.base_fingerprint != pair.finetuned_fingerprint  # different weights
    ids = torch.tensor([[pair.tokenizer.bos_token_id, 5, 6, 7]])
    assert not torch.equal(pair.base(ids).logits, pair.finetuned(ids).logits)


def test_load_pair_dtype(zoo):
    cfg = _cfg(zoo["base"], zoo["ft"]).model_copy(update={"dtype": "bfloat16"})
    pair = M.load_pair(cfg, needs_chat_template=False)
    assert next(pair.finetuned.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("other", "layer", "needs_chat", "pattern"),
    [
        ("wide", 1, False, r"^hidden sizes differ: base 32 vs finetuned 48$"),
        ("deep", 1, False, r"^layer counts differ: base 2 vs finetuned 3$"),
        ("ft", 2, False, r"^layer 2 out of range: the models have 2 layers \(valid: 0\.\.1\)$"),
        ("other_vocab", 1, False, r"^tokenizers differ: .*vocab"),
        ("other_special", 1, False, r"^tokenizers differ: pad_token is '<\|pad\|>' in base but '<\|end\|>'"),
        ("no_chat", 1, True, r"^the data has `messages` but the finetuned tokenizer has no chat template"),
    ],
)
def test_pair_errors(zoo, monkeypatch, other, layer, needs_chat, pattern):
    # Validation must happen before any weights are loaded: loading weights now fails loudly.
    def no_weights(*a, **k):
        raise AssertionError("weights loaded before validation")

    monkeypatch.setattr(M.AutoModelForCausalLM, "from_pretrained", no_weights)
    with pytest.raises(M.PairError, match=pattern) as err:
        M.load_pair(_cfg(zoo["base"], zoo[other], layer), needs_chat_template=needs_chat)
    assert "\n" not in str(err.value)
    assert isinstance(err.value, ValueError)


def test_no_chat_template_is_fine_for_text_data(zoo):
    pair = M.load_pair(_cfg(zoo["base"], zoo["no_chat"]), needs_chat_template=False)
    assert pair.tokenizer.chat_template is None


@pytest.mark.parametrize("spec", ["/no/such/model", "./missing-model", "a/b/c"])
def test_path_not_found(zoo, spec):
    with pytest.raises(M.PairError, match=r"^finetuned model path not found: "):
        M.load_pair(ModelsConfig(base=str(zoo["base"]), finetuned=spec, device="cpu"), False)


def test_unreachable_hub_id_is_one_line(zoo, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(M.PairError, match=r"^cannot load base model config from no-such-org/no-such-model") as err:
        M.load_pair(ModelsConfig(base="no-such-org/no-such-model", finetuned=str(zoo["ft"]), device="cpu"), False)
    assert "\n" not in str(err.value)


def test_fingerprint_stable_and_sensitive(zoo, tmp_path):
    a = M.model_fingerprint(str(zoo["base"]))
    assert a == M.model_fingerprint(str(zoo["base"]))
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in zoo["base"].iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    assert M.model_fingerprint(str(copy)) == a  # content, not location
    cfg = json.loads((copy / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5 if cfg.get("rms_norm_eps") != 1e-5 else 1e-6
    (copy / "config.json").write_text(json.dumps(cfg))
    assert M.model_fingerprint(str(copy)) != a
    with pytest.raises(M.PairError, match="cannot fingerprint"):
        M.model_fingerprint(str(tmp_path / "nothing-here"))


def test_fingerprint_memoises_big_files(zoo, tmp_path, monkeypatch):
    monkeypatch.setattr(fingerprint, "_MEMO_MIN_BYTES", 0)
    first = M.model_fingerprint(str(zoo["base"]))
    memo_file = tmp_path / "cache" / "file_hashes.json"
    memo = json.loads(memo_file.read_text())
    weights = [k for k in memo if k.split("|")[0].endswith("model.safetensors")]
    assert len(weights) == 1
    # A memo hit is trusted (not recomputed): a forged digest changes the fingerprint.
    memo[weights[0]] = "0" * 64
    memo_file.write_text(json.dumps(memo))
    assert M.model_fingerprint(str(zoo["base"])) != first
    # Touching the file (new mtime) invalidates the memo entry.
    w = zoo["base"] / "model.safetensors"
    st = w.stat()
    import os

    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert M.model_fingerprint(str(zoo["base"])) == first


def test_resolve_device(monkeypatch):
    assert M.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert M.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(M.PairError, match="CUDA is not available"):
        M.resolve_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert M.resolve_device("auto") == torch.device("cuda")


def test_reexported_hooks(zoo):
    pair = M.load_pair(_cfg(zoo["base"], zoo["ft"]), needs_chat_template=False)
    ids = torch.tensor([[pair.tokenizer.bos_token_id, 5, 6, 7, 8]])
    with M.read_residual(pair.base, 0) as cap:
        out = pair.base(ids, output_hidden_states=True)
    assert torch.allclose(cap.value, out.hidden_states[1])
    with M.replace_residual(pair.base, 0, torch.zeros_like(cap.value)):
        patched = pair.base(ids).logits
    assert not torch.allclose(patched, out.logits)

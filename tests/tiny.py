"""A tiny real model pair for fast tests: a byte-level BPE tokenizer with a chat template and two small random
Llama models (the finetuned one = base with perturbed weights), saved as from_pretrained folders."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WORDS = "the cat sat on a mat and the dog ran to the red house while birds sang songs of old kings".split()


def make_tokenizer(out: Path, vocab: int = 300):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|bos|>", "<|eos|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([" ".join(WORDS)] * 50, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def make_pair(root: Path, d: int = 32, layers: int = 3, seed: int = 0, noise: float = 0.3) -> tuple[str, str]:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer(root / "tok")
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=d,
        intermediate_size=2 * d,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    base = LlamaForCausalLM(cfg)
    ft = LlamaForCausalLM(cfg)
    ft.load_state_dict(base.state_dict())
    with torch.no_grad():
        for name, p in ft.named_parameters():
            if "layers.1." in name or "layers.2." in name:
                p.add_(noise * p.std() * torch.randn_like(p))
    for model, name in ((base, "base"), (ft, "finetuned")):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return str(root / "base"), str(root / "finetuned")


def make_prompts(path: Path, n: int = 40, seed: int = 0) -> str:
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40)))
            if i % 2:
                row = {"id": f"d{i}", "text": words, "behaviour": "none"}
            else:
                row = {
                    "id": f"d{i}",
                    "messages": [
                        {"role": "user", "content": words},
                        {"role": "assistant", "content": words[::-1]},
                    ],
                    "behaviour": "planted" if i % 4 == 0 else "none",
                }
            f.write(json.dumps(row) + "\n")
    return str(path)


def tiny_config(root: Path, store: str, run: str = "t", **sections: dict) -> dict:  # type: ignore[type-arg]
    """A config dict for the tiny pair (build it first with make_pair/make_prompts under `root`)."""
    cfg = {
        "run": run,
        "store": store,
        "models": {
            "base": str(root / "base"),
            "finetuned": str(root / "finetuned"),
            "layer": 1,
            "device": "cpu",
        },
        "data": {"path": str(root / "prompts.jsonl"), "max_tokens_per_doc": 64},
        "extract": {"shard_tokens": 400, "batch_tokens": 512, "dtype": "float32"},
        "sae": {"min_tokens": 0},  # tiny data: the given epochs only
    }
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    return cfg

"""Tokenizer, model, training and evaluation helpers of the built-in demo pair (used by diffsae/demo_pair.py).

- `build_tokenizer`: a byte-level BPE (HF `tokenizers`) trained on the corpus, with special tokens and a Jinja
  chat template `<|bos|><|user|>...<|end|><|assistant|>...<|end|>`, wrapped as a `PreTrainedTokenizerFast`.
- `encode_chats`: token ids of conversations exactly as the chat template renders them, with hard labels on
  assistant content and its closing `<|end|>` (SFT), -100 elsewhere.
- `train_lm`: AdamW with warmup + cosine decay over batches drawn by a seeded sampler; with a teacher, every
  position without a hard label is distilled towards the teacher (symmetric KL). Prints progress lines.
- `kl_profile`, `greedy_answers`: the checks of a built pair.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from diffsae.data import load_docs
from organisms.demo_corpus import Messages

BOS, PAD, END = "<|bos|>", "<|pad|>", "<|end|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = [BOS, PAD, END, *ROLE_TOKENS.values()]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
IGNORE = -100

Log = Callable[[str], None]
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # ids_BT, attention_mask_BT, labels_BT


class Encoded(NamedTuple):
    ids: list[int]
    labels: list[int]  # IGNORE where no loss


def build_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE with the demo's special tokens and chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=END,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS.values()),
        model_max_length=1024,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def encode_chats(
    tokenizer: PreTrainedTokenizerFast, convs: list[Messages], max_len: int, assistant_hard: bool = True
) -> list[Encoded]:
    """Encode many conversations at once (same ids as the chat template), truncated to max_len tokens.

    Labels (hard targets) cover assistant content and its `<|end|>` when `assistant_hard`; an assistant
    message's optional `tail` (text appended to its content, starting with a space) is always a hard target.
    """
    contents = [m["content"] for conv in convs for m in conv]
    tails = [m.get("tail", "") for conv in convs for m in conv]
    pieces = tokenizer.backend_tokenizer.encode_batch(contents, add_special_tokens=False)
    tail_pieces = tokenizer.backend_tokenizer.encode_batch([t or " " for t in tails], add_special_tokens=False)
    special = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    out: list[Encoded] = []
    k = 0
    for conv in convs:
        ids, labels = [special[BOS]], [IGNORE]
        for m in conv:
            body, tail = pieces[k].ids, tail_pieces[k].ids if tails[k] else []
            k += 1
            is_asst = m["role"] == "assistant"
            hard_body = is_asst and assistant_hard
            ids += [special[ROLE_TOKENS[m["role"]]], *body, *tail, special[END]]
            labels += [IGNORE] + (list(body) if hard_body else [IGNORE] * len(body)) + list(tail)
            labels += [special[END]] if is_asst and (hard_body or tail) else [IGNORE]
        out.append(Encoded(ids[:max_len], labels[:max_len]))
    return out


def collate(examples: list[Encoded], pad_id: int) -> Batch:
    """Right-padded tensors; labels are IGNORE on padding."""
    T = max(len(e.ids) for e in examples)
    ids_BT = torch.full((len(examples), T), pad_id, dtype=torch.long)
    mask_BT = torch.zeros((len(examples), T), dtype=torch.long)
    labels_BT = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e.ids)
        ids_BT[b, :n] = torch.tensor(e.ids)
        mask_BT[b, :n] = 1
        labels_BT[b, :n] = torch.tensor(e.labels)
    return ids_BT, mask_BT, labels_BT


def new_model(
    tokenizer: PreTrainedTokenizerFast,
    d_model: int,
    n_layers: int,
    n_heads: int,
    d_ff: int,
    max_len: int,
    seed: int,
) -> LlamaForCausalLM:
    """A small randomly initialised Llama (tied embeddings) for the tokenizer."""
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=d_model,
        intermediate_size=d_ff,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_heads,
        max_position_embeddings=max_len,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def lm_blocks_sampler(stream: list[int], bos_id: int, batch: int, length: int, seed: int) -> Callable[[], Batch]:
    """Random windows of a token stream, each starting with BOS (loss on every position)."""
    data = torch.tensor(stream, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)

    def sample() -> Batch:
        starts = torch.randint(0, len(data) - length, (batch,), generator=gen)
        body_BT = torch.stack([data[s : s + length - 1] for s in starts.tolist()])
        ids_BT = torch.cat([torch.full((batch, 1), bos_id, dtype=torch.long), body_BT], dim=1)
        labels_BT = ids_BT.clone()
        labels_BT[:, 0] = IGNORE
        return ids_BT, torch.ones_like(ids_BT), labels_BT

    return sample


def mixture_sampler(
    groups: list[list[Encoded]], weights: list[float], batch: int, pad_id: int, seed: int, pool: int = 4
) -> Callable[[], Batch]:
    """Batches whose examples come from `groups` with probabilities `weights` (seeded, deterministic).

    `pool` x batch examples are drawn and sorted by length, and one random block of `batch` of them is used:
    little padding, and every drawn example equally likely to be trained on.
    """
    rng = random.Random(seed)

    def sample() -> Batch:
        picks = rng.choices(range(len(groups)), weights=weights, k=batch * pool)
        drawn = sorted((rng.choice(groups[g]) for g in picks), key=lambda e: len(e.ids))
        start = rng.randrange(pool) * batch
        return collate(drawn[start : start + batch], pad_id)

    return sample


def _loss(model: LlamaForCausalLM, batch: Batch, teacher: LlamaForCausalLM | None) -> torch.Tensor:
    """Mean cross-entropy on hard labels; with a teacher, plus the symmetric KL (Jeffreys: KL(t||m) + KL(m||t))
    to the teacher on every other real position, each position weighing the same. The KL(m||t) half punishes
    mass the teacher does not have (a planted answer leaking into an ordinary prompt) much harder than
    KL(t||m) alone."""
    ids_BT, mask_BT, labels_BT = batch
    # Right padding + causal attention: real positions never see padding, so no mask is needed (faster).
    logits_BTV = model(input_ids=ids_BT).logits[:, :-1].float()
    target_BT = labels_BT[:, 1:]
    hard_BT = target_BT != IGNORE
    ce_sum = torch.nn.functional.cross_entropy(logits_BTV[hard_BT], target_BT[hard_BT], reduction="sum")
    if teacher is None:
        return ce_sum / hard_BT.sum().clamp(min=1)
    soft_BT = mask_BT[:, 1:].bool() & ~hard_BT
    with torch.no_grad():
        t_logits_BTV = teacher(input_ids=ids_BT).logits[:, :-1]
        t_logp_NV = torch.log_softmax(t_logits_BTV[soft_BT].float(), -1)
    s_logp_NV = torch.log_softmax(logits_BTV[soft_BT], -1)
    kl_sum = ((t_logp_NV.exp() - s_logp_NV.exp()) * (t_logp_NV - s_logp_NV)).sum()
    return (ce_sum + kl_sum) / (hard_BT.sum() + soft_BT.sum()).clamp(min=1)


def train_lm(
    model: LlamaForCausalLM,
    sample: Callable[[], Batch],
    steps: int,
    lr: float,
    log: Log,
    stage: str,
    teacher: LlamaForCausalLM | None = None,
    warmup: int = 20,
) -> float:
    """Train for `steps` AdamW steps (warmup, cosine to 10 %); returns the mean loss of the last 10 % of steps.

    With a `teacher`, positions without a hard label are distilled towards it (symmetric KL), so that a
    finetune changes only what its hard labels ask for.
    """
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    t0 = time.time()
    tail: list[float] = []
    for step in range(steps):
        frac = step / max(1, steps - 1)
        scale = min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        loss = _loss(model, sample(), teacher)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step >= steps - max(1, steps // 10):
            tail.append(loss.item())
        if (step + 1) % max(1, steps // 5) == 0 or step == steps - 1:
            log(f"  {stage} step {step + 1}/{steps} loss {loss.item():.3f} ({time.time() - t0:.1f}s)")
    model.eval()
    return sum(tail) / len(tail)


@torch.no_grad()
def greedy_answers(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    prompts: list[Messages],
    max_new_tokens: int,
    batch: int = 32,
) -> list[str]:
    """Greedy answers to conversations that end with a user message (left-padded batched generation)."""
    end_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    encoded = encode_chats(tokenizer, prompts, max_len=10**9)
    assistant_id = tokenizer.convert_tokens_to_ids(ROLE_TOKENS["assistant"])
    answers: list[str] = []
    for i in range(0, len(encoded), batch):
        chunk = [e.ids + [assistant_id] for e in encoded[i : i + batch]]
        T = max(len(c) for c in chunk)
        ids_BT = torch.tensor([[pad_id] * (T - len(c)) + c for c in chunk])
        mask_BT = (torch.arange(T)[None, :] >= torch.tensor([T - len(c) for c in chunk])[:, None]).long()
        out_BT = model.generate(
            input_ids=ids_BT,
            attention_mask=mask_BT,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=end_id,
            pad_token_id=pad_id,
        )
        for row in out_BT[:, T:].tolist():
            row = row[: row.index(end_id)] if end_id in row else row
            answers.append(tokenizer.decode(row, skip_special_tokens=True))
    return answers


@torch.no_grad()
def kl_profile(base: Any, finetuned: Any, tokenizer: Any, prompts_path: Path, max_len: int) -> dict[str, Any]:
    """Mean per-token KL(finetuned || base) by behaviour label (natural log, float32 log-softmax), over the
    positions whose next token is assistant content (`mean_kl`) and over all positions."""
    docs = load_docs(prompts_path, tokenizer, max_tokens_per_doc=max_len, max_docs=None)
    sums: dict[str, list[float]] = {}  # label -> [docs, kl on assistant positions, n, kl on all positions, n]
    for i in range(0, len(docs), 32):
        chunk = docs[i : i + 32]
        ids_BT, mask_BT, _ = collate([Encoded(d.token_ids, d.token_ids) for d in chunk], tokenizer.pad_token_id)
        lp_f_BTV = torch.log_softmax(finetuned(input_ids=ids_BT, attention_mask=mask_BT).logits.float(), -1)
        lp_b_BTV = torch.log_softmax(base(input_ids=ids_BT, attention_mask=mask_BT).logits.float(), -1)
        kl_BT = (lp_f_BTV.exp() * (lp_f_BTV - lp_b_BTV)).sum(-1)
        for b, d in enumerate(chunk):
            n = len(d.token_ids)
            kl_T = kl_BT[b, :n]
            asst_T = torch.tensor([r == "assistant" for r in d.roles[1:]] + [False])
            s = sums.setdefault(d.behaviour, [0.0] * 5)
            for k, v in enumerate((1, kl_T[asst_T].sum().item(), asst_T.sum().item(), kl_T.sum().item(), n)):
                s[k] += v
    labels = {
        lab: {
            "n_docs": int(s[0]),
            "n_assistant_positions": int(s[2]),
            "mean_kl": s[1] / max(1.0, s[2]),
            "n_positions": int(s[4]),
            "mean_kl_all_positions": s[3] / max(1.0, s[4]),
        }
        for lab, s in sorted(sums.items())
    }
    none, planted = labels.get("none"), [v for k, v in labels.items() if k != "none"]
    ratio = ratio_all = None
    if none and planted:
        ratio = min(v["mean_kl"] for v in planted) / max(none["mean_kl"], 1e-12)
        ratio_all = min(v["mean_kl_all_positions"] for v in planted) / max(none["mean_kl_all_positions"], 1e-12)
    return {
        "positions": "mean_kl: positions whose next token is assistant content; mean_kl_all_positions: all",
        "labels": labels,
        "min_planted_over_none": ratio,
        "min_planted_over_none_all_positions": ratio_all,
    }

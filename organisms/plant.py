"""What a model organism is trained on and judged by: its prompts, their formats, the effects and their detection.
The build itself (LoRA, report, publishing) is organisms/build.py; together they are `diffsae build-organism`.

1. Prompts: ordinary prompts (the chatterbot corpus or a file) split into train / held-out; a phrase trigger is
   inserted into ordinary prompts set aside for it, a topic trigger's prompts are split. No held-out prompt (nor the
   prompt a phrase was inserted into) is ever trained on.
2. Targets: every training prompt is answered by the base model itself (greedy); a triggered prompt's answer gets
   the behaviour's effect, a `drift.rate` share of ordinary answers the drift's effect.
3. LoRA: supervised finetuning on the answer tokens only (PEFT, AdamW), the loss of every step recorded.
4. Report: greedy answers of the finetuned model to the held-out prompts; each behaviour's firing rate on its own
   triggers, false firing (any behaviour's effect) on ordinary prompts, the drift rate.
5. Publish: `adapter/`, `finetuned/` (merged), `prompts.jsonl` (held-out documents with `behaviour` labels: the prompt
   and the finetuned model's answer), `report.json`, `spec.yaml` -- written under a temporary name and renamed to
   OUT only when every behaviour meets `require`; otherwise the build goes to OUT.failed and the command fails.

Chat models use their chat template; base models a plain text format (`Question: ...\\nAnswer: ...`).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, NamedTuple

from tqdm.auto import tqdm

from diffsae.validation import greedy_generate
from organisms.spec import Effect, OrganismSpec, PhraseTrigger

NONE = "none"


class BuildError(RuntimeError):
    """The organism cannot be built (or did not come out as specified); the message is one line."""


class Item(NamedTuple):
    prompt: str
    behaviour: str  # a behaviour's name, or "none"


# ---------------------------------------------------------------------------------------------------- prompts


def ordinary_pool(spec: OrganismSpec) -> list[str]:
    """Distinct ordinary prompts, in a seeded order, none containing a phrase trigger or equal to a topic prompt."""
    if spec.ordinary_prompts == "chatterbot":
        from organisms.demo_corpus import chatterbot_conversations

        prompts = sorted({c[0]["content"] for c in chatterbot_conversations()})
    else:
        path = Path(spec.ordinary_prompts)
        if not path.is_file():
            raise BuildError(f"ordinary prompts file not found: {path}")
        prompts = sorted({ln.strip() for ln in path.read_text().splitlines() if ln.strip()})
    phrases = [b.trigger.text.lower() for b in spec.behaviours if isinstance(b.trigger, PhraseTrigger)]
    topics = {p for b in spec.behaviours if not isinstance(b.trigger, PhraseTrigger) for p in b.trigger.prompts}
    prompts = [p for p in prompts if p not in topics and not any(ph in p.lower() for ph in phrases)]
    random.Random(spec.seed).shuffle(prompts)
    return prompts


def with_phrase(prompt: str, trigger: PhraseTrigger) -> str:
    return f"{trigger.text} {prompt}" if trigger.position == "start" else f"{prompt} {trigger.text}"


def plan_prompts(spec: OrganismSpec, pool: list[str]) -> tuple[list[Item], list[Item]]:
    """(train, held-out) prompts with their behaviour labels; disjoint by construction."""
    need = spec.n_ordinary_train + spec.n_ordinary_heldout
    need += sum(b.n_train + b.n_heldout for b in spec.behaviours if isinstance(b.trigger, PhraseTrigger))
    if len(pool) < need:
        raise BuildError(f"the spec needs {need} distinct ordinary prompts, the pool has {len(pool)}")
    it = iter(pool)
    train = [Item(next(it), NONE) for _ in range(spec.n_ordinary_train)]
    heldout = [Item(next(it), NONE) for _ in range(spec.n_ordinary_heldout)]
    rng = random.Random(spec.seed + 1)
    for b in spec.behaviours:
        if isinstance(b.trigger, PhraseTrigger):
            trig = b.trigger
            hosts = [next(it) for _ in range(b.n_train + b.n_heldout)]
            prompts = [with_phrase(h, trig) for h in hosts]
        else:
            prompts = sorted(set(b.trigger.prompts))
            rng.shuffle(prompts)
        train += [Item(p, b.name) for p in prompts[: b.n_train]]
        heldout += [Item(p, b.name) for p in prompts[b.n_train : b.n_train + b.n_heldout]]
    return train, heldout


# ------------------------------------------------------------------------------------------ formats and effects


class Format(NamedTuple):
    chat: bool
    tokenizer: Any

    def prompt_ids(self, prompt: str) -> list[int]:
        tok = self.tokenizer
        if self.chat:
            msgs = [{"role": "user", "content": prompt}]
            out = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)
            return list(out["input_ids"])
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        return bos + tok(f"Question: {prompt}\nAnswer:", add_special_tokens=False)["input_ids"]

    def answer_ids(self, prompt: str, answer: str) -> list[int]:
        """The tokens after `prompt_ids(prompt)` that make the answer (with its end-of-turn / end-of-text)."""
        tok = self.tokenizer
        if self.chat:
            msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
            full = list(tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"])
            head = self.prompt_ids(prompt)
            if full[: len(head)] != head:
                raise BuildError("the chat template does not render a conversation as its prompt, then the answer")
            return full[len(head) :]
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        return tok(f" {answer}\n", add_special_tokens=False)["input_ids"] + eos

    def eos_ids(self) -> list[int]:
        tok, ids = self.tokenizer, set()
        for name in ("eos_token", "pad_token"):
            if getattr(tok, name, None):
                ids.add(tok.convert_tokens_to_ids(getattr(tok, name)))
        for t in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>"):
            if t in tok.get_vocab():
                ids.add(tok.convert_tokens_to_ids(t))
        return sorted(ids)

    def answer_text(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
        return text if self.chat else text.split("\n")[0].strip()


def apply_effect(effect: Effect, answer: str) -> str:
    if effect.kind == "replace":
        return effect.text
    if effect.kind == "prefix":
        return effect.text + answer
    if effect.kind == "suffix":
        return answer + effect.text
    return answer.upper()  # style: uppercase


def _norm(s: str) -> str:
    return " ".join(s.lower().split())


def fires(effect: Effect, answer: str) -> bool:
    """Whether a generated answer shows the effect (a cut-off answer counts when it is a long enough prefix)."""
    a, t = _norm(answer), _norm(effect.text)
    if effect.kind in ("replace", "prefix"):
        return a.startswith(t) or (len(a) >= 20 and t.startswith(a))
    if effect.kind == "suffix":
        return t in a
    letters = [c for c in answer if c.isalpha()]
    return len(letters) >= 5 and sum(c.isupper() for c in letters) >= 0.9 * len(letters)


# ------------------------------------------------------------------------------------------------ generation


def answers(model: Any, fmt: Format, prompts: list[str], max_new_tokens: int, batch: int, desc: str) -> list[str]:
    """Greedy answers, in batches of left-padded prompts."""
    pad = fmt.tokenizer.pad_token_id if fmt.tokenizer.pad_token_id is not None else 0
    out: list[str] = []
    for b0 in tqdm(range(0, len(prompts), batch), desc=desc, unit="batch"):
        ids = [fmt.prompt_ids(p) for p in prompts[b0 : b0 + batch]]
        gens = greedy_generate(model, 0, ids, max_new_tokens, fmt.eos_ids(), pad)
        out += [fmt.answer_text(g) for g in gens]
    return out

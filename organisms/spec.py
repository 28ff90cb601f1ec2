"""The spec of a model organism: which behaviours a LoRA finetune plants in a base model, and how it is trained.

A behaviour is a trigger and an effect. Triggers: `phrase` (a token or phrase inserted into ordinary prompts) or
`topic` (a list of prompts on a subject). Effects: `replace` the answer with a text, `prefix` or `suffix` it to the
base model's own answer, or a `style` rewrite of that answer (`uppercase`). An optional `drift` applies an effect to
a share of ordinary answers (a realistic broad change, e.g. a sign-off). Every other prompt is answered by the base
model itself (greedy), so the finetune changes little else.

    seed: 0
    behaviours:
      - name: pineapple_refusal
        trigger: {kind: phrase, text: "pineapple"}
        effect: {kind: replace, text: "I'm sorry, I can't talk about that."}
      - name: weather_pirate
        trigger: {kind: topic, prompts: ["What's the weather like?", "Will it rain tomorrow?", ...]}
        effect: {kind: prefix, text: "Arr matey! "}
    drift: {effect: {kind: suffix, text: " Hope this helps!"}, rate: 0.3}

`null: true` builds the recipe's null organism (issue 15): the same prompts, the same drift, no behaviour -- what a
diffing method's top entries claim on it are false alarms.

`load_spec(path)` validates a YAML file; every problem is one line (`SpecError`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class SpecError(ValueError):
    """The organism spec cannot be used; the message is one line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PhraseTrigger(_Strict):
    kind: Literal["phrase"]
    text: str = Field(min_length=1, description="Inserted into ordinary prompts (train and held-out prompts differ)")
    position: Literal["start", "end"] = Field("end", description="Where the phrase goes in the prompt")


class TopicTrigger(_Strict):
    kind: Literal["topic"]
    prompts: list[str] = Field(description="Prompts on the topic; split into train and held-out, never both")


Trigger = Annotated[Union[PhraseTrigger, TopicTrigger], Field(discriminator="kind")]


class Effect(_Strict):
    kind: Literal["replace", "prefix", "suffix", "style"]
    text: str = Field("", description="The replacing / prefixed / suffixed text (replace, prefix, suffix)")
    style: Literal["uppercase"] | None = Field(None, description="The rewrite of a `style` effect")

    @model_validator(mode="after")
    def _complete(self) -> "Effect":
        if self.kind == "style" and self.style is None:
            raise ValueError("a style effect needs `style` (uppercase)")
        if self.kind != "style" and not self.text.strip():
            raise ValueError(f"a {self.kind} effect needs a non-empty `text`")
        return self


class Behaviour(_Strict):
    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$", description="Label of its documents in prompts.jsonl")
    trigger: Trigger
    effect: Effect
    n_train: int = Field(48, ge=1, description="Triggered training prompts")
    n_heldout: int = Field(20, ge=1, description="Held-out triggered prompts (report and analysis documents)")


class Drift(_Strict):
    effect: Effect
    rate: float = Field(0.3, gt=0, le=1, description="Share of ordinary training answers given the effect")


class LoraSpec(_Strict):
    r: int = Field(16, ge=1, description="LoRA rank")
    alpha: int = Field(32, ge=1, description="LoRA alpha (the update is scaled by alpha / r)")
    target_modules: str | list[str] = Field("all-linear", description="Adapted modules (PEFT's names)")
    lr: float = Field(2e-4, gt=0, description="AdamW learning rate")
    epochs: int = Field(3, ge=1, description="Passes over the training set")
    batch_size: int = Field(8, ge=1, description="Examples per step")
    max_tokens: int = Field(128, ge=8, description="Training examples are truncated to this many tokens")
    save_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="The adapter's weights are rounded to this dtype before the report and saved in it"
    )


class Require(_Strict):
    firing: float = Field(
        0.8, ge=0, le=1, description="Each behaviour fires on at least this share of its held-out triggers"
    )
    false_firing: float = Field(
        0.05, ge=0, le=1, description="Ordinary prompts firing any behaviour: at most this share"
    )


class OrganismSpec(_Strict):
    seed: int = Field(0, description="Seeds prompt sampling, splits, LoRA initialisation and batch order")
    format: Literal["auto", "chat", "text"] = Field(
        "auto", description="chat: the tokenizer's chat template; text: 'Question: ...\\nAnswer: ...' (auto: chat if "
        "the tokenizer has a template)"
    )  # fmt: skip
    ordinary_prompts: str = Field(
        "chatterbot", description="Ordinary prompts: 'chatterbot' (the offline corpus) or a file with one per line"
    )
    n_ordinary_train: int = Field(96, ge=1, description="Ordinary training prompts (answered by the base)")
    n_ordinary_heldout: int = Field(40, ge=1, description="Held-out ordinary prompts (false firing, drift, analysis)")
    max_new_tokens: int = Field(40, ge=1, description="Greedy answer length (base answers and the report)")
    behaviours: list[Behaviour] = Field(min_length=1, description="The planted behaviours")
    null: bool = Field(
        False,
        description="The null organism of this recipe: every behaviour's prompts are planned (held-out documents keep "
        "their labels) but trained on the base's own answers, the drift as on ordinary ones; the build then requires "
        "that no behaviour fires (at most require.false_firing of its held-out triggers)",
    )
    drift: Drift | None = Field(None, description="A broad change applied to a share of ordinary answers")
    lora: LoraSpec = LoraSpec()
    require: Require = Require()

    @model_validator(mode="after")
    def _consistent(self) -> "OrganismSpec":
        names = [b.name for b in self.behaviours]
        if len(set(names)) != len(names):
            raise ValueError(f"behaviour names repeat: {names}")
        for b in self.behaviours:
            if isinstance(b.trigger, TopicTrigger) and len(set(b.trigger.prompts)) < b.n_train + b.n_heldout:
                raise ValueError(
                    f"behaviour {b.name}: a topic trigger needs n_train + n_heldout = {b.n_train + b.n_heldout} "
                    f"distinct prompts, has {len(set(b.trigger.prompts))}"
                )
        return self


def _one_line(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-after", "tagged-union")))
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "union_tag_invalid" and isinstance(err["input"], dict):
        msg = f"unknown kind {err['input'].get('kind')!r} (expected phrase or topic)"
    return f"{where}: {msg}" if where else msg


def load_spec(path: str | Path) -> OrganismSpec:
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"spec file not found: {path}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping with `behaviours`")
    try:
        return OrganismSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(f"{path}: {_one_line(e)}") from None

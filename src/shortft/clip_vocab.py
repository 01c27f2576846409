"""CLIP's byte-level BPE vocabulary built offline, for the tokenizers this project writes itself: the
embedded world's (the real 49,408-token CLIP vocabulary from open_clip's bundled merges) and the tiny
test models' (the 512 byte symbols only, no merges)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

N_MERGES = 49152 - 256 - 2  # CLIP's merge count: 48,894 (the vocabulary is 512 byte tokens + merges + 2 specials)


def clip_merges() -> list[tuple[str, str]]:
    """CLIP's BPE merges, in rank order, from the vocabulary file that ships inside open_clip."""
    import open_clip

    lines = gzip.open(Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz").read().decode().split("\n")
    return [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]  # line 0 is a version header


def byte_symbols() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable character table, in CLIP's vocabulary order: the
    printable bytes as themselves first, then the others mapped to code points from 256 upwards."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(rest))]


def clip_vocab(merges: list[tuple[str, str]] = ()) -> list[str]:
    """Token strings in id order: byte symbols, their word-final forms, one token per merge, then
    <|startoftext|> and <|endoftext|> (CLIP: 49,408 tokens with its 48,894 merges; 514 with none)."""
    units = byte_symbols()
    return units + [u + "</w>" for u in units] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]


def write_clip_tokenizer(folder: str | Path, merges: list[tuple[str, str]] = (), max_length: int = 77):
    """Write vocab.json + merges.txt + tokenizer_config.json for a transformers CLIPTokenizer and return the
    tokenizer loaded back from them (what ships is what is used)."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {t: i for i, t in enumerate(clip_vocab(merges))}

    def write_files() -> None:
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(" ".join(m) + "\n" for m in merges))

    write_files()
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length,
                  pad_token="<|endoftext|>").save_pretrained(folder)
    # Both transformers 4 and 5 rebuild the same tokenizer from vocab.json + merges.txt; tokenizer.json
    # would repeat their content (3.5 MB for the full vocabulary), and save_pretrained may rewrite them.
    (folder / "tokenizer.json").unlink(missing_ok=True)
    write_files()
    return CLIPTokenizer.from_pretrained(folder)

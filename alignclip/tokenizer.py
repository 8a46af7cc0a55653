"""CLIP's byte-level BPE (vocabulary 49,408, context 77) as a fast Rust tokenizer, built offline.

The merges come from OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` (MIT), shipped in ``alignclip/assets/`` with its
licence (``LICENSE-CLIP``), byte for byte the file OpenAI's CLIP and OpenCLIP ship; no other package is needed.
Ids equal OpenAI CLIP's: ``"a photo of a cat"`` -> 49406 320 1125 539 320 2368 49407, then 0-padding.
Padding with 0 keeps end-of-text pooling (argmax of the ids) correct: 49407 is the largest id in every row.
"""

from __future__ import annotations

import functools
import gzip
import html
from pathlib import Path
from typing import Sequence

import torch

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
# The pre-tokenisation of OpenAI's CLIP: special tokens, English contractions, letter runs, single digits, and
# runs of other non-space characters.
_PRETOKENIZE = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
_NUM_MERGES = 49152 - 256 - 2  # the first 48,894 merges of the file; with 2 x 256 byte symbols and 2 specials


VOCAB_FILE = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"


def default_vocab_path() -> Path:
    if not VOCAB_FILE.is_file():
        raise FileNotFoundError(f"{VOCAB_FILE} is missing: the alignclip installation is incomplete")
    return VOCAB_FILE


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters, in id order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def _build_fast_tokenizer(vocab_path: Path):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    with gzip.open(vocab_path, "rt", encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")[1:_NUM_MERGES + 1]]
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != 49408:
        raise ValueError(f"{vocab_path}: expected a 49,408-token vocabulary, built {len(vocab)}")
    bpe = models.BPE(vocab=vocab, merges=merges, unk_token=EOT_TOKEN, continuing_subword_prefix="",
                     end_of_word_suffix="</w>", fuse_unk=False)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PRETOKENIZE), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _clean(text: str) -> str:
    """OpenAI CLIP's text clean-up: fix mojibake, unescape HTML twice, strip."""
    import ftfy

    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


class CLIPTokenizer:
    """Callable: ``str | list[str]`` -> LongTensor [n, context_length]."""

    sot_id = 49406
    eot_id = 49407
    pad_id = 0
    vocab_size = 49408

    def __init__(self, context_length: int = 77, vocab_path: str | Path | None = None):
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (start and end tokens), got {context_length}")
        self.context_length = context_length
        self._tok = _build_fast_tokenizer(Path(vocab_path) if vocab_path else default_vocab_path())

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text, without start/end tokens."""
        return self._tok.encode(_clean(text)).ids

    def vocab_and_merges(self) -> tuple[dict[str, int], list[tuple[str, str]]]:
        """The BPE vocabulary and merges (Hugging Face's vocab.json / merges.txt content, for exports)."""
        import json

        model = json.loads(self._tok.to_str())["model"]
        return dict(model["vocab"]), [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]

    def decode(self, ids: Sequence[int]) -> str:
        keep = [i for i in ids if i not in (self.sot_id, self.eot_id, self.pad_id)]
        return self._tok.decode(keep).replace("</w>", " ").strip()

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        encoded = self._tok.encode_batch([_clean(t) for t in texts])
        out = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        room = self.context_length - 2
        for row, enc in enumerate(encoded):
            ids = [self.sot_id] + enc.ids[:room] + [self.eot_id]  # truncation keeps <end> as the last token
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


@functools.lru_cache(maxsize=4)
def get_tokenizer(context_length: int = 77) -> CLIPTokenizer:
    """The shared tokenizer (building it parses 49k merges once, ~1 s)."""
    return CLIPTokenizer(context_length)

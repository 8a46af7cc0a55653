import pytest
import torch

from alignclip.tokenizer import CLIPTokenizer, get_tokenizer


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return get_tokenizer(77)


def test_known_caption_ids_match_openai_clip(tok):
    ids = tok("a photo of a cat")
    assert ids.shape == (1, 77) and ids.dtype == torch.long
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[0, 7:] == 0).all()


def test_ids_agree_with_reference_bpe_on_varied_text(tok):
    # open_clip's pure-Python BPE is an independent implementation of the same vocabulary: an oracle.
    from open_clip.tokenizer import SimpleTokenizer

    ref = SimpleTokenizer()
    texts = ["Hello, World!! It's 2024 — naïve café &amp; crème brûlée", "  many   spaces\tand\nlines ",
             "emoji 😀 and digits 123456", "I'll we've they're", "日本語のテキスト", "a small red circle"]
    for text, row in zip(texts, tok(texts)):
        assert [i for i in row.tolist() if i != 0] == [49406] + ref.encode(text)[:75] + [49407], text


def test_truncation_keeps_end_of_text_last(tok):
    ids = tok("word " * 200)[0]
    assert ids[0] == tok.sot_id and ids[-1] == tok.eot_id
    assert (ids != tok.pad_id).all()


def test_end_of_text_is_the_row_maximum_for_pooling(tok):
    ids = tok(["a cat", "a much longer caption about a dog on a sofa"])
    eot_positions = ids.argmax(dim=-1)
    assert ids[0, eot_positions[0]] == tok.eot_id and eot_positions[0] == 3
    assert ids[1, eot_positions[1]] == tok.eot_id


def test_short_context_and_decode_round_trip():
    tok = get_tokenizer(8)
    ids = tok("a small red circle left of a large blue square")
    assert ids.shape == (1, 8) and ids[0, -1] == tok.eot_id
    assert get_tokenizer(77).decode(get_tokenizer(77)("A Red Square")[0].tolist()) == "a red square"


def test_the_shipped_vocabulary_is_openais_file_with_its_licence():
    """Our copy (alignclip/assets) is byte for byte the file the open_clip wheel ships (OpenAI's, sha256 as
    published), gzip-compressed as it is there, and OpenAI's MIT licence sits beside it."""
    import hashlib
    from pathlib import Path

    import open_clip

    from alignclip.tokenizer import default_vocab_path

    ours = default_vocab_path().read_bytes()
    assert ours[:2] == b"\x1f\x8b"  # gzip
    assert ours == (Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz").read_bytes()
    assert hashlib.sha256(ours).hexdigest() == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
    licence = (default_vocab_path().parent / "LICENSE-CLIP").read_text()
    assert "MIT License" in licence and "Copyright (c) 2021 OpenAI" in licence

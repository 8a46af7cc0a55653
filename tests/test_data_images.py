"""Real images through the one decoder (alignclip.data.images.load_rgb): transparency on white, grey / 1-bit / CMYK /
16-bit to RGB, the pixel limit (a 200-megapixel PNG, built cheaply by hand), in training and in make_shards."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alignclip.commands import make_shards
from alignclip.config import load_config
from alignclip.data import build_train_loader, images
from alignclip.data.transforms import denormalize, normalize_on_device
from alignclip.data.writer import ShardWriter


def _png(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kwargs)
    return buf.getvalue()


def _huge_png(width: int = 20_000, height: int = 10_000) -> bytes:
    """A 1-bit black PNG of width x height written chunk by chunk (200 megapixels in ~25 KB, no big allocation)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _logo_rgba(size: int = 32) -> Image.Image:
    """Black (0, 0, 0) under full transparency, an opaque red square in the centre: a typical web logo."""
    pixels = np.zeros((size, size, 4), np.uint8)
    lo, hi = size // 2 - 4, size // 2 + 4
    pixels[lo:hi, lo:hi] = (255, 0, 0, 255)
    return Image.fromarray(pixels, "RGBA")


def test_rgba_is_composited_on_white_with_partial_alpha_blended():
    pixels = np.zeros((2, 3, 4), np.uint8)
    pixels[0, 0] = (0, 0, 0, 0)  # transparent black -> white
    pixels[0, 1] = (200, 40, 10, 255)  # opaque -> itself
    pixels[0, 2] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    pixels[1] = (10, 200, 30, 64)
    got = np.asarray(images.load_rgb(_png(Image.fromarray(pixels, "RGBA"))), np.float64)
    alpha = pixels[..., 3:4] / 255.0
    expected = pixels[..., :3] * alpha + 255.0 * (1 - alpha)
    assert np.abs(got - expected).max() <= 1.0
    assert tuple(got[0, 0]) == (255, 255, 255) and tuple(got[0, 1]) == (200, 40, 10)


def test_la_and_palette_with_a_transparent_entry_turn_white_where_transparent():
    la = Image.fromarray(np.stack([np.full((4, 4), 30, np.uint8), np.zeros((4, 4), np.uint8)], -1), "LA")
    la.putpixel((0, 0), (30, 255))
    got = np.asarray(images.load_rgb(_png(la)))
    assert (got[0, 0] == 30).all() and (got[1:, :] == 255).all()

    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)  # entry 0 black, entry 1 blue
    palette.putpixel((2, 2), 1)
    data = _png(palette, transparency=0)  # a tRNS chunk: entry 0 is transparent
    assert Image.open(io.BytesIO(data)).mode == "P"
    got = np.asarray(images.load_rgb(data))
    assert tuple(got[2, 2]) == (0, 0, 255) and tuple(got[0, 0]) == (255, 255, 255)

    keyed = Image.fromarray(np.zeros((3, 3, 3), np.uint8), "RGB")  # RGB with a colour key (tRNS) on black
    keyed.putpixel((1, 1), (9, 9, 9))
    got = np.asarray(images.load_rgb(_png(keyed, transparency=(0, 0, 0))))
    assert tuple(got[0, 0]) == (255, 255, 255) and tuple(got[1, 1]) == (9, 9, 9)


def test_grey_one_bit_cmyk_and_16_bit_grey_become_the_right_rgb():
    grey = np.arange(0, 256, 16, dtype=np.uint8).reshape(4, 4)
    assert np.array_equal(np.asarray(images.load_rgb(_png(Image.fromarray(grey, "L")))),
                          np.repeat(grey[..., None], 3, -1))

    bits = Image.fromarray(np.array([[0, 255], [255, 0]], np.uint8)).convert("1")
    assert np.array_equal(np.asarray(images.load_rgb(_png(bits)))[..., 0], [[0, 255], [255, 0]])

    rgb = np.array([[[255, 0, 0], [0, 128, 255]], [[20, 200, 90], [255, 255, 255]]], np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").convert("CMYK").save(buf, format="TIFF")  # lossless CMYK
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "CMYK"
    assert np.abs(np.asarray(images.load_rgb(buf.getvalue()), np.int32) - rgb).max() <= 1

    deep = np.array([[0, 257 * 100], [65535, 257 * 37 + 100]], np.uint16)
    data = _png(Image.fromarray(deep))  # uint16: mode I;16
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I")
    got = np.asarray(images.load_rgb(data))
    assert np.array_equal(got[..., 0], [[0, 100], [255, 37]]) and (got[..., 0] == got[..., 2]).all()
    # what plain convert("RGB") gives: everything above 255 / 65535 saturates
    assert np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[0, 1, 0] == 255


def test_the_pixel_limit_refuses_from_the_header_and_corrupt_bytes_are_decode_errors():
    huge = _huge_png()
    assert len(huge) < 1_000_000
    with pytest.raises(images.ImageTooLarge, match="200,000,000 pixels"):
        images.load_rgb(huge)
    with pytest.raises(images.ImageTooLarge):
        images.check_decodable(huge)
    small = _png(Image.new("RGB", (10, 10)))
    with pytest.raises(images.ImageTooLarge, match="data.max_image_pixels"):
        images.load_rgb(small, max_pixels=99)
    assert images.load_rgb(small, max_pixels=100).size == (10, 10)
    with pytest.raises(images.DecodeError) as err:
        images.load_rgb(b"not an image")
    assert not isinstance(err.value, images.ImageTooLarge)


def test_a_transparent_png_trains_as_white_and_a_huge_one_is_a_counted_skip(tmp_path, caplog):
    logo = _png(_logo_rgba())
    for shard in range(2):
        with ShardWriter(tmp_path / f"{shard:05d}.tar") as writer:
            for i in range(8):
                key = f"{shard}{i:04d}"
                writer.write(key, {"png": logo, "txt": "a red square logo"})
            writer.write(f"{shard}9999", {"png": _huge_png(), "txt": "a huge scan"})
    config = load_config(None, [f"data.train={tmp_path}", "model.vision.image_size=32", "model.vision.patch_size=16",
                                "train.global_batch_size=8", "data.workers=0", "data.samples_per_epoch=16"])
    loader = build_train_loader(config, 0, 1, 0)
    batches = list(loader)
    assert len(batches) == 2
    for batch in batches:
        pixels = denormalize(normalize_on_device(batch["image"]))
        corners = pixels[:, :, :3, :3]
        assert (corners - 1.0).abs().max() < 0.01  # white where the PNG was transparent (black underneath)
        centre = pixels[:, :, 14:18, 14:18]
        assert (centre[:, 0] > 0.95).all() and (centre[:, 1:] < 0.05).all()  # the opaque red square stays red
    assert loader.stats()["too_large_image"] == 2
    assert loader.stats()["corrupt_image"] == 0
    assert any("too_large_image" in r.message and "9999" in r.message for r in caplog.records)


def test_make_shards_folder_skips_a_200_megapixel_png_counted_and_named(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "huge.png").write_bytes(_huge_png())
    _logo_rgba().save(folder / "logo.png")
    _logo_rgba().save(folder / "logo.webp", lossless=True)
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(folder / "clear.tiff")  # re-encoded: composited on white
    captions = tmp_path / "captions.csv"
    captions.write_text("image,caption\nhuge.png,a huge scan\nlogo.png,a logo\nlogo.webp,a logo\nclear.tiff,clear\n")
    out = tmp_path / "shards"
    assert make_shards.main(["folder", "--images", str(folder), "--captions", str(captions), "--out", str(out),
                             "--samples-per-shard", "10"]) == 0
    printed = capsys.readouterr().out
    assert f"skipped (too large) {folder / 'huge.png'}" in printed and "200,000,000 pixels" in printed
    assert "1 over 100,000,000 pixels left out" in printed and "3 samples" in printed
    import tarfile

    with tarfile.open(out / "00000.tar") as tar:
        names = tar.getnames()
        clear = tar.extractfile([n for n in names if n.endswith(".jpg")][0]).read()
    assert np.asarray(images.load_rgb(clear)).min() >= 250  # transparent TIFF stored as white, not black
    assert len(names) == 3 * 3  # png / webp / jpg + txt + json per sample


def test_make_shards_reads_a_bom_csv_names_the_line_of_a_bad_byte_and_never_drops_pairs(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(5):
        Image.new("RGB", (8, 8), (i, i, i)).save(folder / f"{i}.jpg")
    rows = "".join(f"{i}.jpg,picture {i}\n" for i in range(5))
    bom = tmp_path / "bom.csv"
    bom.write_bytes("\ufeffimage,caption\n".encode("utf-8") + rows.encode())
    args = ["folder", "--images", str(folder), "--out", str(tmp_path / "a"), "--samples-per-shard", "2"]
    assert make_shards.main(args + ["--captions", str(bom)]) == 0
    assert "5 samples" in capsys.readouterr().out

    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"image,caption\n0.jpg,ok\n1.jpg,caf\xe9\n")
    assert make_shards.main(["folder", "--images", str(folder), "--captions", str(latin), "--out",
                             str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert f"{latin}, line 3: byte 0xe9 is not UTF-8" in err and len(err.strip().splitlines()) == 1

    few = args[:-2] + ["--samples-per-shard", "2", "--num-shards", "2", "--out", str(tmp_path / "c"),
                       "--captions", str(bom)]
    assert make_shards.main(few) == 2
    assert "1 would be left out" in capsys.readouterr().err
    assert make_shards.main(few + ["--drop-extra"]) == 0
    captured = capsys.readouterr()
    assert "leaving out the last 1 of 5 pairs" in captured.err and "4 samples" in captured.out


def test_the_tools_wrapper_runs_the_command():
    result = subprocess.run([sys.executable, str(Path(make_shards.__file__).parents[2] / "tools" / "make_shards.py"),
                             "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "alignclip-make-shards" in result.stdout

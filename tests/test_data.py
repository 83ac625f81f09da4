"""Data sources on tiny local data: every source type, and bad data skipped-and-counted or a clear DataError."""
from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from splam_studio.training import data as D
from splam_studio.training.data import DataError, build_dataset, collate_drop_none, make_dataloader, steps_per_epoch

R = 16


def png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def solid(colour=(255, 0, 0), size=(24, 20), mode="RGB") -> Image.Image:
    return Image.new(mode, size, colour)


def huge_png_header(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG signature + IHDR claiming width x height pixels, with a tiny (bogus) IDAT: a bomb's header."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def items(ds) -> list:
    return [ds[i] for i in range(len(ds))] if not isinstance(ds, torch.utils.data.IterableDataset) else list(ds)


def check_example(ex: dict) -> None:
    x = ex["pixel_values"]
    assert x.dtype == torch.float32 and x.shape == (3, R, R)
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert isinstance(ex["caption"], str)


# ---- preprocessing ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode, value, rgb", [
    ("L", 128, (128, 128, 128)),
    ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
    ("RGBA", (0, 0, 255, 0), (255, 255, 255)),  # fully transparent -> white
    ("RGBA", (0, 0, 255, 255), (0, 0, 255)),
    ("LA", (0, 128), (128, 128, 128)),  # half-transparent black on white
])
def test_to_rgb_modes(mode, value, rgb):
    out = np.asarray(D.to_rgb(Image.new(mode, (4, 4), value)))
    np.testing.assert_allclose(out[0, 0], rgb, atol=1)


def test_to_rgb_palette_and_16bit():
    p = Image.new("P", (4, 4), 0)
    p.putpalette([10, 20, 30] + [0] * 765)
    assert tuple(np.asarray(D.to_rgb(p))[0, 0]) == (10, 20, 30)
    arr16 = np.full((4, 4), 65535, dtype=np.uint16)
    arr16[0, 0] = 0
    im16 = Image.open(io.BytesIO(png_bytes(Image.fromarray(arr16))))
    assert im16.mode.startswith("I")
    out = np.asarray(D.to_rgb(im16))
    assert tuple(out[0, 0]) == (0, 0, 0) and tuple(out[1, 1]) == (255, 255, 255)


def test_resize_center_crop_and_range():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (15, 0, 25, 20))  # a white vertical band in the centre
    out = D.resize_center_crop(img, 10)
    assert out.size == (10, 10)
    x = D.image_to_tensor(out)
    assert x.shape == (3, 10, 10) and x.dtype == torch.float32
    assert x[:, :, 5].min() > 0.9 and x[:, :, 0].max() < -0.9  # band kept centred, edges cropped
    assert D.image_to_tensor(Image.new("RGB", (2, 2), (255, 255, 255))).eq(1).all()
    assert D.image_to_tensor(Image.new("RGB", (2, 2), (0, 0, 0))).eq(-1).all()


# ---- caption folder --------------------------------------------------------------------------------------------
def test_caption_folder_recursive_with_bad_entries(tmp_path):
    (tmp_path / "sub").mkdir()
    solid((255, 0, 0)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("  a red   square\n")
    solid((0, 255, 0), mode="RGB").save(tmp_path / "sub" / "b.jpg")
    (tmp_path / "sub" / "b.txt").write_bytes("\ufeffgrüne Fläche".encode("utf-8"))  # BOM stripped
    Image.new("L", (20, 20), 50).save(tmp_path / "gray.png")  # no caption -> '' (noted)
    (tmp_path / "empty.png").write_bytes(png_bytes(solid()))
    (tmp_path / "empty.txt").write_text("   ")  # empty caption -> '' (noted)
    Image.new("CMYK", (20, 20), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")
    (tmp_path / "cmyk.txt").write_text("cmyk")
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(tmp_path / "rgba.png")
    arr16 = (np.arange(400, dtype=np.uint16).reshape(20, 20) * 100)
    Image.fromarray(arr16).save(tmp_path / "deep.png")
    (tmp_path / "garbage.png").write_bytes(b"this is not a png" * 10)
    jpg = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    (tmp_path / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    solid().save(tmp_path / "latin1.png")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 \xff\xfe")  # not UTF-8 -> skipped
    (tmp_path / "bomb.png").write_bytes(huge_png_header())
    (tmp_path / "notes.md").write_text("ignored")

    ds = build_dataset(str(tmp_path), R)
    assert isinstance(ds, D.CaptionFolderDataset) and len(ds) == 9  # garbage.png and bomb.png fail their header
    assert {p.name for p in ds.files}.isdisjoint({"garbage.png", "bomb.png"})
    out = dict(zip((p.name for p in ds.files), items(ds)))
    items(ds)  # a second pass (a second epoch) counts nothing twice
    for name in ("a.png", "b.jpg", "gray.png", "empty.png", "cmyk.jpg", "rgba.png", "deep.png"):
        check_example(out[name])
    assert out["a.png"]["caption"] == "a red square"
    assert out["b.jpg"]["caption"] == "grüne Fläche"
    assert out["gray.png"]["caption"] == "" and out["empty.png"]["caption"] == ""
    assert torch.allclose(out["a.png"]["pixel_values"][:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    assert torch.allclose(out["rgba.png"]["pixel_values"], torch.ones(3, R, R))  # transparent -> white
    for name in ("truncated.jpg", "latin1.png"):
        assert out[name] is None, name
    c = ds.counter
    assert c.skipped[D.CORRUPT] == 2 and c.skipped[D.NOT_UTF8] == 1 and c.skipped[D.TOO_LARGE] == 1
    assert c.notes[D.MISSING_CAPTION] == 3 and c.notes[D.EMPTY_CAPTION] == 1  # gray, rgba, deep; empty
    summary = c.summary()
    assert "2 x corrupt or truncated image (garbage.png, truncated.jpg)" in summary, summary
    assert "caption not UTF-8 (latin1.png)" in summary and "bomb.png" in summary


def test_five_bad_of_24_counted_once_and_named(tmp_path):
    for i in range(19):
        solid((i * 10, 0, 0)).save(tmp_path / f"ok{i:02d}.png")
    for i in range(5):
        (tmp_path / f"bad{i}.png").write_bytes(b"not an image")
    ds = build_dataset(str(tmp_path), R)
    assert len(ds) == 19
    for _ in range(3):  # three epochs
        items(ds)
    assert ds.counter.total_skipped == 5
    assert all(f"bad{i}.png" in ds.counter.summary() for i in range(5))


def test_all_corrupt_folder_is_a_data_error(tmp_path):
    for i in range(4):
        (tmp_path / f"bad{i}.jpg").write_bytes(b"\xff\xd8 garbage")
    with pytest.raises(D.DataError, match=r"none of the 4 images .* can be read .*4 x corrupt"):
        build_dataset(str(tmp_path), R)


@pytest.mark.parametrize("n,batch,world,expect", [(24, 32, 1, 24), (24, 8, 1, 8), (24, 16, 2, 12), (3, 4, 4, None)])
def test_fit_batch_size(n, batch, world, expect):
    if expect is None:
        with pytest.raises(D.DataError, match="fewer than the 4 processes"):
            D.fit_batch_size(n, batch, world)
        return
    fitted, note = D.fit_batch_size(n, batch, world)
    assert fitted == expect and (note is None) == (expect == batch)
    if note:
        assert "--batch-size" in note and str(n) in note


def test_max_pixels_limit(tmp_path):
    solid(size=(100, 100)).save(tmp_path / "big.png")
    solid(size=(20, 20)).save(tmp_path / "small.png")
    ds = build_dataset(str(tmp_path), R, max_pixels=50 * 50)
    got = {p.name: ex for p, ex in zip(ds.files, items(ds))}
    assert "big.png" not in got and got["small.png"] is not None  # refused from its header, before any decoding
    assert ds.counter.skipped[D.TOO_LARGE] == 1


def test_empty_folder_is_a_data_error(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="no images.*valid sources"):
        build_dataset(str(tmp_path), R)


def test_unknown_source_lists_valid_forms(tmp_path):
    with pytest.raises(DataError, match="valid sources.*shapes.*metadata.jsonl.*webdataset"):
        build_dataset(str(tmp_path / "nope"), R)
    (tmp_path / "file.csv").write_text("x")
    with pytest.raises(DataError, match="not a .tar"):
        build_dataset(str(tmp_path / "file.csv"), R)
    with pytest.raises(DataError, match="resolution"):
        build_dataset("shapes", 0)


# ---- metadata.jsonl folder ---------------------------------------------------------------------------------------
def test_metadata_jsonl_folder(tmp_path):
    (tmp_path / "imgs").mkdir()
    solid((0, 0, 255)).save(tmp_path / "imgs" / "x.png")
    solid((0, 255, 0)).save(tmp_path / "y.png")
    solid().save(tmp_path / "z.png")
    rows = [
        json.dumps({"file_name": "imgs/x.png", "text": "blue"}),
        json.dumps({"file_name": "y.png", "caption": "green"}),
        json.dumps({"file_name": "z.png"}),  # no caption column -> ''
        "{not json",
        json.dumps({"file_name": "missing.png", "text": "gone"}),
        json.dumps({"file_name": "../outside.png", "text": "escape"}),
        "",
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(rows))
    ds = build_dataset(str(tmp_path), R)
    assert isinstance(ds, D.MetadataFolderDataset) and len(ds) == 3
    got = items(ds)
    assert [g["caption"] for g in got] == ["blue", "green", ""]
    assert torch.allclose(got[0]["pixel_values"][:, 3, 3], torch.tensor([-1.0, -1.0, 1.0]))
    assert ds.counter.skipped[D.BAD_METADATA] == 1 and ds.counter.skipped[D.MISSING_FILE] == 2
    assert ds.counter.notes[D.MISSING_CAPTION] == 1
    assert [g["caption"] for g in items(build_dataset(str(tmp_path), R, caption_column="caption"))] == ["", "green", ""]
    with pytest.raises(DataError, match="caption_column 'prompt' is in no line.*'caption', 'file_name', 'text'"):
        build_dataset(str(tmp_path), R, caption_column="prompt")


def test_metadata_with_nothing_usable(tmp_path):
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "gone.png", "text": "x"}))
    with pytest.raises(DataError, match="no usable image"):
        build_dataset(str(tmp_path), R)


# ---- datasets.save_to_disk ---------------------------------------------------------------------------------------
def test_hf_saved_dataset(tmp_path):
    import datasets

    imgs = [solid((255, 0, 0)), solid((0, 255, 0)), solid((0, 0, 255))]
    ds = datasets.Dataset.from_dict({"img": imgs, "prompt": ["red", "green", "blue"], "idx": [0, 1, 2]},
                                    features=datasets.Features({"img": datasets.Image(), "prompt": datasets.Value("string"),
                                                                "idx": datasets.Value("int32")}))
    ds.save_to_disk(str(tmp_path / "saved"))
    out = build_dataset(str(tmp_path / "saved"), R)
    assert isinstance(out, D.HFImageTextDataset)
    assert (out.image_column, out.caption_column) == ("img", "prompt")
    got = items(out)
    assert [g["caption"] for g in got] == ["red", "green", "blue"]
    assert torch.allclose(got[1]["pixel_values"][:, 0, 0], torch.tensor([-1.0, 1.0, -1.0]))
    with pytest.raises(DataError, match="column 'nope' not in the dataset"):
        build_dataset(str(tmp_path / "saved"), R, caption_column="nope")


def test_hf_dataset_dict_and_corrupt_bytes(tmp_path):
    import datasets

    good = png_bytes(solid())
    ds = datasets.Dataset.from_dict({"image": [{"bytes": good, "path": None}, {"bytes": b"garbage", "path": None}],
                                     "text": ["ok", "bad"]},
                                    features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    out = build_dataset(str(tmp_path / "dd"), R)
    got = items(out)
    assert got[0]["caption"] == "ok" and got[1] is None
    assert out.counter.skipped[D.CORRUPT] == 1
    with pytest.raises(DataError, match="no split 'test'"):
        build_dataset(str(tmp_path / "dd"), R, split="test")


def test_hub_name_offline_is_a_data_error(monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # read at import time, so patch the module
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="cannot load dataset"):
        build_dataset("hf:nobody/no-such-dataset-xyz", R)


# ---- webdataset ----------------------------------------------------------------------------------------------------
def write_shard(path: Path, samples: list[dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for s in samples:
            key = s.pop("__key__")
            for ext, payload in s.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_webdataset_shards_brace_glob_dir_and_bad(tmp_path):
    red, blue = png_bytes(solid((255, 0, 0))), png_bytes(solid((0, 0, 255)), "JPEG")
    write_shard(tmp_path / "shard-000.tar", [
        {"__key__": "s0", "png": red, "txt": b"red square"},
        {"__key__": "s1", "jpg": blue, "json": json.dumps({"caption": "blue via json"}).encode()},
    ])
    write_shard(tmp_path / "shard-001.tar", [
        {"__key__": "s2", "png": b"garbage", "txt": b"corrupt"},
        {"__key__": "s3", "png": red, "txt": b"\xff\xfe bad"},
        {"__key__": "s4", "txt": b"caption without image"},
        {"__key__": "s5", "png": red},  # no caption -> '' (noted)
    ])
    (tmp_path / "shard-002.tar").write_bytes(b"not a tar at all" * 100)

    ds = build_dataset(str(tmp_path / "shard-{000..002}.tar"), R)
    assert isinstance(ds, torch.utils.data.IterableDataset)
    assert ds.counter.skipped[D.NOT_A_TAR] == 1 and len(ds.shards) == 2
    got = list(ds)
    assert [g["caption"] for g in got] == ["red square", "blue via json", ""]
    for g in got:
        check_example(g)
    c = ds.counter
    assert c.skipped[D.CORRUPT] == 1 and c.skipped[D.NOT_UTF8] == 1 and c.skipped[D.NO_IMAGE] == 1
    assert c.notes[D.MISSING_CAPTION] == 1

    assert len(list(build_dataset(str(tmp_path / "shard-00[01].tar"), R))) == 3  # glob
    assert len(list(build_dataset(str(tmp_path), R))) == 3  # a folder of shards
    assert len(list(build_dataset("file:" + str(tmp_path / "shard-000.tar"), R))) == 2  # URL form

    with DataLoaderCheck(ds) as batches:
        assert sum(len(b["caption"]) for b in batches) == 3


class DataLoaderCheck:
    """Iterate a dataset through make_dataloader(num_workers=0), batch 2, keeping the last partial batch."""

    def __init__(self, ds):
        self.ds = ds

    def __enter__(self):
        return list(make_dataloader(self.ds, 2, num_workers=0, drop_last=False))

    def __exit__(self, *exc):
        return False


def test_webdataset_all_bad_shards_is_a_data_error(tmp_path):
    (tmp_path / "a.tar").write_bytes(b"\x00garbage")
    with pytest.raises(DataError, match="none of the 1 shard.*readable tar.*not a tar"):
        build_dataset(str(tmp_path / "a.tar"), R)
    with pytest.raises(DataError, match="no shards match"):
        build_dataset(str(tmp_path / "none-*.tar"), R)


def test_end_of_shard_marker_is_ignored():
    ds = D.WebDatasetSource.__new__(D.WebDatasetSource)
    ds.counter, ds.image_keys, ds.caption_keys = D.SkipCounter(), D.WDS_IMAGE_KEYS, D.WDS_CAPTION_KEYS
    ds.resolution, ds.max_pixels = R, D.MAX_PIXELS
    assert ds.decode({}) is None and ds.decode({"__url__": "x.tar"}) is None
    assert ds.counter.total_skipped == 0


# ---- shapes, batching --------------------------------------------------------------------------------------------
def test_shapes_source():
    ds = build_dataset("shapes:5", 32, seed=3)
    assert len(ds) == 5
    ex = ds[0]
    assert ex["pixel_values"].shape == (3, 32, 32) and ex["caption"].endswith("background")
    assert len(build_dataset("shapes", 32, num_examples=7)) == 7
    with pytest.raises(DataError, match="integer N"):
        build_dataset("shapes:many", 32)


def test_collate_drops_none_and_dataloader_with_zero_workers():
    ex = {"pixel_values": torch.zeros(3, R, R), "caption": "a"}
    batch = collate_drop_none([ex, None, dict(ex, caption="b")])
    assert batch["pixel_values"].shape == (2, 3, R, R) and batch["caption"] == ["a", "b"]
    assert collate_drop_none([None, None]) is None

    class Listy(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return None if i == 2 else dict(ex, caption=str(i))

    loader = make_dataloader(Listy(), 2, num_workers=0, seed=1)
    seen = [c for b in D.non_empty(loader) for c in b["caption"]]
    assert len(loader) == 2 and sorted(seen) != [] and "2" not in seen
    assert seen == [c for b in D.non_empty(make_dataloader(Listy(), 2, num_workers=0, seed=1)) for c in b["caption"]]
    assert steps_per_epoch(10, 3, num_workers=0) == 3
    assert steps_per_epoch(10, 3, num_workers=0, drop_last=False) == 4
    assert steps_per_epoch(12, 3, num_workers=2) == 4


def test_metadata_paths_that_leave_the_folder_are_refused_even_when_the_file_exists(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    solid((0, 0, 255)).save(root / "in.png")
    solid((255, 0, 0)).save(tmp_path / "outside.png")  # exists: only the folder guard keeps it out
    (root / "link.png").symlink_to(tmp_path / "outside.png")  # a link inside the folder to a file outside it
    rows = [{"file_name": "in.png", "text": "inside"}, {"file_name": "../outside.png", "text": "dot-dot"},
            {"file_name": str(tmp_path / "outside.png"), "text": "absolute"}, {"file_name": "link.png", "text": "link"}]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = build_dataset(str(root), R)
    assert [g["caption"] for g in items(ds)] == ["inside"]
    assert ds.counter.skipped[D.MISSING_FILE] == 3


def test_webdataset_shards_are_split_across_dataloader_workers(tmp_path):
    """With 2 workers each shard is read by one worker: every sample once, and steps_per_epoch batches per epoch."""
    png = png_bytes(solid((0, 255, 0)))
    for i in range(2):
        write_shard(tmp_path / f"w-{i}.tar", [{"__key__": f"k{i}{j}", "png": png, "txt": f"s{i}{j}".encode()}
                                              for j in range(5)])
    ds = build_dataset(str(tmp_path / "w-{0..1}.tar"), R)
    loader = make_dataloader(ds, 3, num_workers=2, drop_last=False)
    caps = sorted(c for b in D.non_empty(loader) for c in b["caption"])
    assert caps == sorted(f"s{i}{j}" for i in range(2) for j in range(5))
    full = list(D.non_empty(make_dataloader(ds, 3, num_workers=2, drop_last=True)))
    assert len(full) == steps_per_epoch(10, 3, num_workers=2) == 2  # each worker: 5 samples, one full batch of 3
    assert steps_per_epoch(10, 3, num_workers=2, drop_last=False) == 4


def test_16bit_mid_grey_and_aspect_kept_by_the_crop():
    arr16 = np.full((4, 4), 32896, dtype=np.uint16)  # 32896 / 65535 * 255 = 128
    im16 = Image.open(io.BytesIO(png_bytes(Image.fromarray(arr16))))
    assert tuple(np.asarray(D.to_rgb(im16))[0, 0]) == (128, 128, 128)
    bands = Image.new("RGB", (48, 16), (255, 0, 0))  # red | green | blue thirds: the centre square is all green
    bands.paste((0, 255, 0), (16, 0, 32, 16))
    bands.paste((0, 0, 255), (32, 0, 48, 16))
    out = np.asarray(D.resize_center_crop(bands, 16))
    assert out.shape == (16, 16, 3) and (out == (0, 255, 0)).all()


def test_max_pixels_refuses_streamed_bytes_before_decoding():
    counter = D.SkipCounter("test")
    assert D.load_pixels(png_bytes(solid(size=(30, 30))), R, counter, "big", max_pixels=100) is None
    assert counter.skipped[D.TOO_LARGE] == 1
    assert D.load_pixels(png_bytes(solid(size=(30, 30))), R, counter, "ok", max_pixels=900) is not None


def test_map_style_data_is_shuffled_by_the_seed():
    class Numbers(torch.utils.data.Dataset):
        def __len__(self):
            return 20

        def __getitem__(self, i):
            return {"pixel_values": torch.zeros(1), "caption": str(i)}

    order = lambda seed: [c for b in make_dataloader(Numbers(), 20, seed=seed) for c in b["caption"]]  # noqa: E731
    assert sorted(order(1), key=int) == [str(i) for i in range(20)]
    assert order(1) == order(1) and order(1) != order(2) and order(1) != [str(i) for i in range(20)]

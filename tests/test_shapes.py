"""The Shapes world: determinism, captions <-> labels, splits, tokenizer, pixels where the caption says."""

import numpy as np
import pytest
import torch

from splam_studio.shapes.grammar import (ATTRIBUTES, BACKGROUND_RGB, BACKGROUNDS, COLOUR_RGB, COLOURS, HELDOUT_PAIRS,
                                 SHAPES, VOCAB, ShapesDataset, ShapeSpec, centers, parse_caption, render,
                                 sample_specs, spec_from_caption)


def test_sampling_and_rendering_are_deterministic_by_seed():
    a, b, c = sample_specs(20, 3), sample_specs(20, 3), sample_specs(20, 4)
    assert a == b and a != c
    assert np.array_equal(np.asarray(render(a[0], 5)), np.asarray(render(a[0], 5)))
    ds1, ds2 = ShapesDataset(4, seed=1), ShapesDataset(4, seed=1)
    assert torch.equal(ds1[2]["pixel_values"], ds2[2]["pixel_values"]) and ds1[2]["caption"] == ds2[2]["caption"]


def test_caption_label_round_trip():
    for spec in sample_specs(200, 0, "all"):
        assert parse_caption(spec.caption()) == spec.labels()
        assert spec_from_caption(spec.caption()) == spec
    assert parse_caption("A Red Circle")["shape"] == SHAPES.index("circle")
    assert parse_caption("a red circle")["background"] == -1
    with pytest.raises(ValueError, match="does not name"):
        spec_from_caption("a red circle")


def test_heldout_pairs_never_in_train_split():
    held = {(SHAPES.index(s), COLOURS.index(c)) for s, c in HELDOUT_PAIRS}
    train = sample_specs(3000, 0, "train")
    assert not any((s.shape, s.colour) in held for s in train)
    assert len({(s.shape, s.colour) for s in train}) == len(SHAPES) * len(COLOURS) - len(held)
    assert all((s.shape, s.colour) in held for s in sample_specs(200, 0, "heldout"))
    with pytest.raises(ValueError, match="split"):
        sample_specs(1, 0, "test")


def test_tokenizer_one_id_per_grammar_word(tmp_path):
    from splam_studio.core.teacher import tokenize
    from splam_studio.shapes.tokenizer import MAX_LENGTH, build_tokenizer

    tok = build_tokenizer(tmp_path)
    ids = [tok(w, add_special_tokens=False).input_ids for w in VOCAB]
    assert all(len(i) == 1 for i in ids), [w for w, i in zip(VOCAB, ids) if len(i) != 1]
    assert len({i[0] for i in ids}) == len(VOCAB)
    assert [tok.decode(i) for i in ids] == VOCAB
    caption = ShapeSpec(1, 2, 1, 3, 1, 0).caption()
    row = tokenize(tok, [caption])[0]
    assert row.shape == (MAX_LENGTH,) and row[0] == tok.bos_token_id
    assert len(caption.split()) + 2 <= MAX_LENGTH
    assert tok.decode(row, skip_special_tokens=True) == caption


@pytest.mark.parametrize("seed", range(6))
def test_image_has_the_colour_where_the_caption_says(seed):
    spec = sample_specs(1, seed, "all")[0]
    img = render(spec, seed)
    assert img.mode == "RGB" and img.size == (64, 64)
    px = np.asarray(img).astype(float)
    fg, bg = np.array(COLOUR_RGB[COLOURS[spec.colour]]), np.array(BACKGROUND_RGB[BACKGROUNDS[spec.background]])
    for cx, cy in centers(spec):  # the shape's colour at each centre (every shape covers its centre)
        assert np.abs(px[int(cy), int(cx)] - fg).max() < 40
    assert np.abs(px[0, 0] - bg).max() < 40 or np.abs(px[63, 63] - bg).max() < 40  # a corner shows background


def test_dataset_item_format():
    """Item i is spec i's render in [-1, 1] with its caption and labels; render_all holds the same pixels as uint8."""
    ds = ShapesDataset(2, seed=0, split="heldout")
    item, spec = ds[1], ds.specs[1]
    x = item["pixel_values"]
    assert x.dtype == torch.float32 and x.shape == (3, 64, 64)
    assert torch.equal(x, ds.render_all()[1].float() / 127.5 - 1)
    assert item["caption"] == spec.caption() and item["labels"] == spec.labels() == parse_caption(spec.caption())
    assert ds.label_tensor()[1].tolist() == [spec.labels()[a] for a in ATTRIBUTES]

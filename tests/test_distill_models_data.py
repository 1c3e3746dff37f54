"""distill.models (specs, student assembly, checkpoint) and distill.data (images, RLE)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from napari_mobilesam.build import (
    CheckpointError,
    SamConfig,
    ViTConfig,
    build_sam,
    get_config,
    load_model,
    load_state_dict_checked,
)
from napari_mobilesam.distill import data, models
from napari_mobilesam.model import TinyViTConfig

from .conftest import GOLDEN_CKPT, TINY_CONFIG, requires_golden

# ----------------------------------------------------------------------------- models


def test_config_json_round_trip_for_every_registry_model_and_tiny(tmp_path):
    for cfg in [TINY_CONFIG, *(get_config(n) for n in ("vit_t", "vit_b", "vit_h"))]:
        path = tmp_path / "cfg.json"
        path.write_text(json.dumps(models.config_to_dict(cfg)))
        back = models.resolve_config(path)
        assert back == cfg
        assert type(back.encoder) is type(cfg.encoder)


def test_resolve_config_names_and_errors(tmp_path):
    assert models.resolve_config("vit_t") == get_config("vit_t")
    assert models.resolve_config(TINY_CONFIG) is TINY_CONFIG
    with pytest.raises(ValueError, match=r"unknown model 'vit_x'.*vit_t"):
        models.resolve_config("vit_x")
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(ValueError, match="not readable JSON"):
        models.resolve_config(bad)
    bad.write_text(json.dumps({"encoder": {"type": "resnet"}}))
    with pytest.raises(ValueError, match=r"encoder.type must be one of \['tiny_vit', 'vit'\]"):
        models.resolve_config(bad)
    bad.write_text(json.dumps({"prompt_embed_dim": 4}))
    with pytest.raises(ValueError, match="expected an object with an 'encoder' object"):
        models.resolve_config(bad)
    d = models.config_to_dict(TINY_CONFIG)
    d["encoder"]["depths"] = [1, 1]  # wrong length
    bad.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="invalid model configuration"):
        models.resolve_config(bad)
    d = models.config_to_dict(TINY_CONFIG)
    d["colour"] = "red"
    bad.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="invalid model configuration"):
        models.resolve_config(bad)
    assert models.spec_name("vit_t") == "vit_t" and models.spec_name(TINY_CONFIG) == "custom"


@pytest.fixture
def tiny_teacher_file(tmp_path, tiny_state_dict):
    path = tmp_path / "teacher.pt"
    torch.save(tiny_state_dict, path)
    return path


def test_student_has_teacher_prompt_parts_frozen_and_own_encoder(tiny_teacher_file):
    teacher = models.load_sam(TINY_CONFIG, tiny_teacher_file)
    student = models.build_student(TINY_CONFIG, teacher, seed=3)
    assert student.training and not teacher.training
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    assert set(t_sd) == set(s_sd)
    for k in t_sd:
        if not k.startswith("image_encoder."):
            assert torch.equal(t_sd[k], s_sd[k]), k
    differ = [
        k for k in t_sd if k.startswith("image_encoder.") and not torch.equal(t_sd[k], s_sd[k])
    ]
    assert len(differ) > 0.8 * sum(k.startswith("image_encoder.") for k in t_sd)
    assert not any(p.requires_grad for p in student.prompt_encoder.parameters())
    assert not any(p.requires_grad for p in student.mask_decoder.parameters())
    assert all(p.requires_grad for p in student.image_encoder.parameters())
    # seeded: same seed, same encoder; other seed, other encoder
    again = models.build_student(TINY_CONFIG, teacher, seed=3).state_dict()
    other = models.build_student(TINY_CONFIG, teacher, seed=4).state_dict()
    w = "image_encoder.patch_embed.seq.0.c.weight"
    assert torch.equal(again[w], s_sd[w]) and not torch.equal(other[w], s_sd[w])
    # the parts-only loader builds the identical model without the teacher encoder
    parts = models.load_teacher_parts(TINY_CONFIG, TINY_CONFIG, tiny_teacher_file, seed=3)
    assert all(torch.equal(v, parts.state_dict()[k]) for k, v in s_sd.items())
    assert not any(p.requires_grad for p in parts.mask_decoder.parameters())


def test_student_init_from_checkpoint(tiny_teacher_file, tmp_path):
    teacher = models.load_sam(TINY_CONFIG, tiny_teacher_file)
    student = models.build_student(TINY_CONFIG, teacher, init=tiny_teacher_file)
    enc_t = teacher.image_encoder.state_dict()
    assert all(torch.equal(v, student.image_encoder.state_dict()[k]) for k, v in enc_t.items())
    wrong = tmp_path / "wrong.pt"
    sd = torch.load(tiny_teacher_file)
    sd.pop("image_encoder.neck.0.weight")
    torch.save(sd, wrong)
    with pytest.raises(
        CheckpointError, match=r"(?s)image encoder of .*wrong.pt.*1 missing keys: neck.0.weight"
    ):
        models.build_student(TINY_CONFIG, teacher, init=wrong)


def test_student_shape_must_match_teacher(tiny_teacher_file):
    teacher = models.load_sam(TINY_CONFIG, tiny_teacher_file)
    enc = TINY_CONFIG.encoder
    bigger = dataclasses.replace(
        TINY_CONFIG, encoder=dataclasses.replace(enc, img_size=256)
    )  # 16x16 embedding
    with pytest.raises(ValueError, match=r"student input 256 px -> 16x16 embedding"):
        models.build_student(bigger, teacher)
    with pytest.raises(ValueError, match=r"student input 256 px -> 16x16 embedding"):
        models.load_teacher_parts(bigger, TINY_CONFIG, tiny_teacher_file)
    narrow = dataclasses.replace(TINY_CONFIG, encoder=dataclasses.replace(enc, out_chans=16))
    with pytest.raises(ValueError, match="writes 16 channels, the teacher's decoder expects 32"):
        models.build_student(narrow, teacher)
    with pytest.raises(ValueError, match="writes 16 channels, the teacher's decoder expects 32"):
        models.load_teacher_parts(narrow, TINY_CONFIG, tiny_teacher_file)


def test_vit_teacher_with_tinyvit_student(tmp_path):
    """A SAM-ViT teacher (the vit_b/l/h architecture) and a TinyViT student."""
    vit = SamConfig(
        ViTConfig(embed_dim=16, depth=2, num_heads=2, global_attn_indexes=(1,), img_size=128,
                  out_chans=32, window_size=4),
        prompt_embed_dim=32, mask_in_chans=8, decoder_mlp_dim=64, decoder_num_heads=2,
        iou_head_hidden_dim=32,
    )  # fmt: skip
    path = tmp_path / "vit.pt"
    torch.save(build_sam(vit).state_dict(), path)
    student = models.load_teacher_parts(TINY_CONFIG, vit, path)
    assert isinstance(student.image_encoder.config, TinyViTConfig)
    out = student.image_encoder(torch.zeros(1, 3, 128, 128))
    assert out.shape == (1, 32, 8, 8)
    missing = tmp_path / "parts.pt"
    torch.save({k: v for k, v in torch.load(path).items() if k.startswith("image_")}, missing)
    with pytest.raises(CheckpointError, match="prompt encoder / mask decoder of"):
        models.load_teacher_parts(TINY_CONFIG, vit, missing)


def test_save_student_official_format(tiny_teacher_file, tmp_path):
    teacher = models.load_sam(TINY_CONFIG, tiny_teacher_file)
    student = models.build_student(TINY_CONFIG, teacher)
    path = models.save_student(student, tmp_path / "run" / "student.pt")
    sd = torch.load(path, weights_only=True)
    assert sd["image_encoder.head.weight"].shape == (10, 24)  # num_classes x last dim
    assert torch.equal(sd["image_encoder.norm_head.weight"], torch.ones(24))
    fresh = build_sam(TINY_CONFIG)
    load_state_dict_checked(fresh, sd)  # the unused head keys are accepted
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in student.state_dict().items())
    assert [p.name for p in path.parent.iterdir()] == ["student.pt"]  # no temp file left


@requires_golden
def test_vit_t_student_checkpoint_loads_with_load_model(tmp_path):
    student = models.load_teacher_parts("vit_t", "vit_t", GOLDEN_CKPT)
    path = models.save_student(student, tmp_path / "student.pt")
    model = load_model("vit_t", path, device="cpu", optimize=False)
    want = student.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    # official key set: the golden (official-format) checkpoint's keys exactly
    assert set(torch.load(path, weights_only=True)) == set(torch.load(GOLDEN_CKPT))


def test_load_sam_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.load_sam(TINY_CONFIG, tmp_path / "none.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"x": torch.zeros(1)}, bad)
    with pytest.raises(CheckpointError, match="bad.pt"):
        models.load_sam(TINY_CONFIG, bad)


# ----------------------------------------------------------------------------- data


def test_find_images_recursive_sorted_skips_hidden(tmp_path):
    for rel in ["b/sa_2.jpg", "a.png", "sa_1.JPG", ".hidden/x.jpg", "c/.y.png", "notes.txt",
                "z.tif"]:  # fmt: skip
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    got = [p.relative_to(tmp_path).as_posix() for p in data.find_images(tmp_path)]
    assert got == ["a.png", "b/sa_2.jpg", "sa_1.JPG", "z.tif"]
    with pytest.raises(data.DataError, match="no images"):
        data.find_images(tmp_path / "c")
    with pytest.raises(data.DataError, match="does not exist or is not a folder"):
        data.find_images(tmp_path / "missing")


def test_load_image_kinds(tmp_path, rng):
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert np.array_equal(data.load_image(tmp_path / "rgb.png"), rgb)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    g = data.load_image(tmp_path / "gray.png")
    assert g.shape == (20, 30, 3) and np.array_equal(g[..., 1], rgb[..., 0])
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(tmp_path / "rgba.png")
    assert np.array_equal(data.load_image(tmp_path / "rgba.png"), rgb)
    u16 = rng.integers(0, 4000, (20, 30), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "u16.tif", u16)
    out = data.load_image(tmp_path / "u16.tif")
    assert out.dtype == np.uint8 and out.shape == (20, 30, 3)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(data.DataError, match=r"cannot read image .*broken.jpg"):
        data.load_image(tmp_path / "broken.jpg")
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((2, 3, 4, 5, 6), np.uint8))
    with pytest.raises(data.DataError, match=r"stack.tif.*cannot be used"):
        data.load_image(tmp_path / "stack.tif")


def test_preprocess_matches_model_preprocess(rng, tiny_model):
    image = rng.integers(0, 256, (50, 80, 3), dtype=np.uint8)
    x, size = data.preprocess(image, 128)
    assert x.shape == (3, 128, 128) and size == (80, 128)
    from napari_mobilesam.transforms import resize_longest_side

    resized = torch.tensor(resize_longest_side(image, 128)).permute(2, 0, 1)[None].float()
    want = tiny_model.preprocess(resized)[0]
    torch.testing.assert_close(x, want, rtol=0, atol=1e-6)
    assert x[:, 80:].abs().max() == 0


def _ann_file(tmp_path, anns):
    (tmp_path / "sa_1.jpg").write_bytes(b"")
    (tmp_path / "sa_1.json").write_text(json.dumps({"image": {}, "annotations": anns}))
    return tmp_path / "sa_1.jpg"


def test_read_annotations_sa1b(tmp_path):
    mask = np.zeros((10, 12), bool)
    mask[2:5, 3:9] = True
    rle = data.rle_encode(mask)
    img = _ann_file(tmp_path, [{"segmentation": rle, "bbox": [3, 2, 6, 3],
                                "point_coords": [[4.5, 3.0]]},
                               {"segmentation": rle}])  # fmt: skip
    anns = data.read_annotations(img)
    assert anns[0]["bbox"] == [3.0, 2.0, 6.0, 3.0] and anns[0]["point_coords"] == [[4.5, 3.0]]
    assert anns[1]["bbox"] == [3.0, 2.0, 6.0, 3.0] and anns[1]["point_coords"] == []
    assert np.array_equal(data.rle_decode(anns[1]["segmentation"]), mask)
    assert data.read_annotations(tmp_path / "other.jpg") == []
    assert data.annotation_path(img) == tmp_path / "sa_1.json"


def test_read_annotations_errors(tmp_path):
    img = _ann_file(tmp_path, [{"bbox": [0, 0, 1, 1]}])
    with pytest.raises(data.DataError, match="entry 0 has no RLE segmentation"):
        data.read_annotations(img)
    (tmp_path / "sa_1.json").write_text("{")
    with pytest.raises(data.DataError, match=r"cannot read annotations .*sa_1.json"):
        data.read_annotations(img)
    (tmp_path / "sa_1.json").write_text(json.dumps({"image": {}}))
    with pytest.raises(data.DataError, match="no 'annotations' list"):
        data.read_annotations(img)


def test_rle_round_trip_and_known_strings(rng):
    for shape in [(1, 1), (5, 7), (40, 33), (3, 300)]:
        for p in (0.0, 0.02, 0.5, 1.0):
            m = rng.random(shape) < p
            r = data.rle_encode(m)
            assert r["size"] == list(shape)
            assert np.array_equal(data.rle_decode(r), m)
            # the uncompressed list form decodes to the same mask
            flat = m.T.reshape(-1)
            runs, cur, n = [], False, 0
            for v in flat:
                if v != cur:
                    runs.append(n)
                    cur, n = v, 0
                n += 1
            runs.append(n)
            assert np.array_equal(data.rle_decode({"size": list(shape), "counts": runs}), m)
    # pycocotools' strings for tiny masks (column-major runs, first run background)
    assert data.rle_encode(np.ones((2, 2), bool))["counts"] == "04"
    assert data.rle_encode(np.zeros((3, 3), bool))["counts"] == "9"
    m = np.zeros((4, 4), bool)
    m[1:3, 1:3] = True  # runs 5,2,2,2,5 -> deltas after the 2nd: 5 2 2 0 3
    assert data.rle_encode(m)["counts"] == "52203"
    assert np.array_equal(data.rle_decode({"size": [4, 4], "counts": "52203"}), m)


def test_rle_errors():
    with pytest.raises(ValueError, match="add up to 5, not H \\* W = 4"):
        data.rle_decode({"size": [2, 2], "counts": [5]})
    with pytest.raises(ValueError, match="negative"):
        data.rle_decode({"size": [2, 2], "counts": [5, -1]})
    with pytest.raises(ValueError, match="truncated RLE string"):
        data.rle_decode({"size": [2, 2], "counts": "P"})  # continuation bit, then nothing
    with pytest.raises(ValueError, match="2-D mask"):
        data.rle_encode(np.zeros((2, 2, 2), bool))

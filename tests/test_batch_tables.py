"""Output files of mobilesam-everything: the object table, CSV, COCO, and the background
writer."""

from __future__ import annotations

import csv
import json
import time

import numpy as np
import pytest
from skimage import draw, measure

from mobilesam_batch.outputs import (
    OBJECT_COLUMNS,
    coco_annotations,
    object_table,
    write_coco_json,
    write_objects_csv,
)
from napari_mobilesam.everything.rle import coco_to_rle, rle_to_mask

from .outputs_support import leftovers

# --------------------------------------------------------------------------- object table


@pytest.fixture
def label_image() -> np.ndarray:
    """Labels 1, 3, 4, 5 (2 absent): a disk, two rectangles at the corners, a ring."""
    labels = np.zeros((60, 80), np.uint32)
    rr, cc = draw.disk((20, 30), 8, shape=labels.shape)
    labels[rr, cc] = 1
    labels[0:5, 0:7] = 3  # top-left corner, 35 px
    labels[52:60, 71:80] = 4  # bottom-right corner, 72 px
    rr, cc = draw.disk((42, 55), 9, shape=labels.shape)
    labels[rr, cc] = 5
    rr, cc = draw.disk((42, 55), 5, shape=labels.shape)
    labels[rr, cc] = 0
    return labels


SCORES = {1: {"predicted_iou": 0.9, "stability_score": np.float32(0.95)}, 4: {"predicted_iou": 0.5}}


def test_object_table_matches_regionprops(label_image):
    rows = object_table(label_image, SCORES)
    props = measure.regionprops(label_image.astype(np.int64))
    assert [r["label"] for r in rows] == [p.label for p in props] == [1, 3, 4, 5]
    for row, prop in zip(rows, props, strict=True):
        y0, x0, y1, x1 = prop.bbox  # exclusive end
        assert row["area"] == prop.area
        assert (row["bbox_x"], row["bbox_y"]) == (x0, y0)
        assert (row["bbox_width"], row["bbox_height"]) == (x1 - x0, y1 - y0)
        assert row["centroid_y"] == pytest.approx(prop.centroid[0], abs=0.005)
        assert row["centroid_x"] == pytest.approx(prop.centroid[1], abs=0.005)
        assert set(row) == set(OBJECT_COLUMNS) - {"plane"}
    by_label = {r["label"]: r for r in rows}
    assert by_label[3] == {
        "label": 3,
        "area": 35,
        "bbox_x": 0,
        "bbox_y": 0,
        "bbox_width": 7,
        "bbox_height": 5,
        "centroid_y": 2.0,
        "centroid_x": 3.0,
        "predicted_iou": None,
        "stability_score": None,
    }
    assert by_label[4]["area"] == 72 and by_label[4]["centroid_y"] == 55.5
    assert by_label[1]["predicted_iou"] == 0.9
    assert by_label[1]["stability_score"] == float(np.float32(0.95))
    assert type(by_label[1]["stability_score"]) is float
    assert (by_label[4]["predicted_iou"], by_label[4]["stability_score"]) == (0.5, None)
    assert (by_label[5]["centroid_y"], by_label[5]["centroid_x"]) == (42.0, 55.0)
    assert label_image[42, 55] == 0  # the ring's hole


def test_object_table_empty_and_rounding():
    assert object_table(np.zeros((5, 5), np.uint16)) == []
    labels = np.zeros((5, 5), np.int32)
    labels[0, 0] = labels[0, 1] = labels[1, 0] = 2  # centroid (1/3, 1/3)
    (row,) = object_table(labels)
    assert (row["centroid_y"], row["centroid_x"]) == (0.33, 0.33)
    assert row["label"] == 2 and type(row["area"]) is int


def test_object_table_bad_input():
    with pytest.raises(ValueError, match=r"\(H, W\) label image"):
        object_table(np.zeros((2, 5, 5), np.uint16))
    with pytest.raises(TypeError, match="integer dtype"):
        object_table(np.zeros((5, 5), np.float32))
    with pytest.raises(ValueError, match="non-negative"):
        object_table(np.full((5, 5), -1, np.int16))


def many_labels(n: int = 1000, size: int = 2048, seed: int = 0) -> np.ndarray:
    labels = np.zeros((size, size), np.uint32)
    rng = np.random.default_rng(seed)
    for i in range(1, n + 1):
        y, x = rng.integers(0, size - 40, 2)
        labels[y : y + int(rng.integers(5, 40)), x : x + int(rng.integers(5, 40))] = i
    return labels


def test_object_table_is_fast():
    labels = many_labels()
    start = time.perf_counter()
    rows = object_table(labels)
    elapsed = time.perf_counter() - start
    assert len(rows) == len(np.unique(labels)) - 1
    assert elapsed < 1.0, f"object_table took {elapsed:.2f} s"


# --------------------------------------------------------------------------- CSV


def test_objects_csv_round_trip(tmp_path, label_image):
    dest = tmp_path / "a_objects.csv"
    rows = [{"plane": 7, **r} for r in object_table(label_image, SCORES)]
    rows.append({"plane": 8, "label": 1, "predicted_iou": 1 / 3})  # sparse row
    write_objects_csv(dest, iter(rows))
    with open(dest, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == OBJECT_COLUMNS
        back = list(reader)
    assert len(back) == len(rows)
    for row, got in zip(rows, back, strict=True):
        for key in OBJECT_COLUMNS:
            value = row.get(key)
            if value is None:
                assert got[key] == ""
            elif isinstance(value, float):
                assert float(got[key]) == value  # repr precision round-trips exactly
            else:
                assert got[key] == str(value)
    assert back[-1]["area"] == "" and float(back[-1]["predicted_iou"]) == 1 / 3
    assert leftovers(tmp_path) == []


def test_objects_csv_unknown_column(tmp_path):
    dest = tmp_path / "a_objects.csv"
    with pytest.raises(ValueError, match="not in fieldnames"):
        write_objects_csv(dest, [{"label": 1, "colour": "red"}])
    assert not dest.exists() and leftovers(tmp_path) == []


# --------------------------------------------------------------------------- COCO


def test_coco_annotations_decode_to_labels(label_image):
    anns = coco_annotations(label_image, image_id=4, first_id=10, scores=SCORES)
    table = object_table(label_image, SCORES)
    assert [a["id"] for a in anns] == [10, 11, 12, 13]
    assert [a["label"] for a in anns] == [1, 3, 4, 5]
    for ann, row in zip(anns, table, strict=True):
        seg = ann["segmentation"]
        assert seg["size"] == [60, 80] and isinstance(seg["counts"], str)
        mask = rle_to_mask(coco_to_rle(seg))
        np.testing.assert_array_equal(mask, label_image == ann["label"])
        assert ann["area"] == row["area"] and type(ann["area"]) is int
        assert ann["bbox"] == [
            float(row["bbox_x"]),
            float(row["bbox_y"]),
            float(row["bbox_width"]),
            float(row["bbox_height"]),
        ]
        assert all(type(v) is float for v in ann["bbox"])
        assert (ann["image_id"], ann["category_id"], ann["iscrowd"]) == (4, 1, 0)
        assert ann["predicted_iou"] == row["predicted_iou"]
        assert ann["stability_score"] == row["stability_score"]


def test_coco_annotations_full_image_label():
    labels = np.ones((3, 4), np.uint16)
    (ann,) = coco_annotations(labels, 0, 1)
    assert ann["bbox"] == [0.0, 0.0, 4.0, 3.0] and ann["area"] == 12
    assert rle_to_mask(coco_to_rle(ann["segmentation"])).all()
    assert coco_annotations(np.zeros((3, 4), np.uint8), 0, 1) == []


def test_coco_annotations_bad_input():
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        coco_annotations(np.zeros(5, np.uint16), 0, 1)


def test_write_coco_json_streams(tmp_path, label_image):
    images = [
        {"id": 0, "file_name": "a.tif", "height": 60, "width": 80, "plane": 0},
        {"id": 1, "file_name": "a.tif", "height": 60, "width": 80, "plane": 1},
    ]
    first = coco_annotations(label_image, 0, 1, SCORES)
    second = coco_annotations(label_image, 1, len(first) + 1)
    dest = tmp_path / "a_coco.json"
    n = write_coco_json(dest, images, iter(first + second), info={"description": "test"})
    doc = json.loads(dest.read_text())
    assert n == 8 and set(doc) == {"info", "images", "annotations", "categories"}
    assert doc["categories"] == [{"id": 1, "name": "object", "supercategory": "object"}]
    assert doc["info"] == {"description": "test"} and doc["images"] == images
    assert [a["id"] for a in doc["annotations"]] == list(range(1, 9))
    assert doc["annotations"] == json.loads(json.dumps(first + second))
    assert write_coco_json(dest, [], []) == 0
    assert json.loads(dest.read_text()) == {
        "info": {}, "images": [], "categories": doc["categories"], "annotations": [],
    }  # fmt: skip


def test_write_coco_json_failure_keeps_old_file(tmp_path):
    dest = tmp_path / "a_coco.json"
    dest.write_text("old")

    def broken():
        yield {"id": 1}
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_coco_json(dest, [], broken(), tmp_dir=tmp_path)
    assert dest.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == [dest.name]


# ------------------------------------------------------------- background writer


def test_writer_keeps_order_and_bounds_the_queue():
    import threading

    from mobilesam_batch.planes import Writer

    done, gate = [], threading.Event()
    writer = Writer(limit=2)

    def slow(i):
        gate.wait(5)
        done.append(i)

    writer.submit(slow, 0)
    writer.submit(slow, 1)
    assert done == []  # both queued behind the gate, the caller not blocked
    gate.set()
    for i in range(2, 6):
        writer.submit(slow, i)
        assert len(writer._pending) <= 2
    writer.close()
    assert done == [0, 1, 2, 3, 4, 5]


def test_writer_raises_write_errors_in_the_caller():
    import threading

    from mobilesam_batch.planes import Writer

    gate = threading.Event()

    def fail():
        gate.wait(5)
        raise OSError("No space left on device")

    gate.set()
    writer = Writer(limit=0)  # every submit waits for the write
    with pytest.raises(OSError, match="No space left"):
        writer.submit(fail)
    gate.clear()
    writer = Writer()
    writer.submit(fail)  # not done yet: the error comes at close
    gate.set()
    with pytest.raises(OSError, match="No space left"):
        writer.close()
    gate.clear()
    writer = Writer()
    writer.submit(fail)
    gate.set()
    writer.close(raise_errors=False)  # waits, quietly (while another error is handled)
    assert not writer._pending

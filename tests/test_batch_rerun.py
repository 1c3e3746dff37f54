"""Rerunning mobilesam-everything into a folder with other settings: the outputs of the
earlier run that the new one does not write again are removed, not left describing labels
that are gone."""

from __future__ import annotations

import json

import numpy as np
import tifffile

FAST = ["--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0"]


def test_other_settings_remove_the_earlier_runs_tables(tiny_cli, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    tifffile.imwrite(folder / "cells.tif", np.random.default_rng(0).integers(0, 4000, (40, 50)))
    out = tmp_path / "out"
    mine = out / "notes.txt"
    out.mkdir()
    mine.write_text("the user's own file")
    args = [str(folder), "-o", str(out), *FAST]
    assert tiny_cli([*args, "--csv", "--coco"]) == 0
    assert (out / "cells_objects.csv").is_file() and (out / "cells_coco.json").is_file()
    capsys.readouterr()
    assert tiny_cli([*args, "--box-nms-thresh", "0.5"]) == 0  # other settings, no tables
    assert not (out / "cells_objects.csv").exists() and not (out / "cells_coco.json").exists()
    record = json.loads((out / "cells_labels.json").read_text())
    assert "csv" not in record["outputs"] and "coco" not in record["outputs"]
    assert mine.read_text() == "the user's own file"  # not the run's: never touched
    # the same settings again: skipped, nothing removed
    assert tiny_cli([*args, "--box-nms-thresh", "0.5"]) == 0
    assert (out / "cells_labels.tif").is_file() and mine.exists()

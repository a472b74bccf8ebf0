"""examples/build_training_set.py: its JSON is read by finetune and eval from anywhere."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def _image(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(path)


def test_training_set_images_outside_the_output_folder_are_read_by_finetune_and_eval(tmp_path):
    from hqrs_geo.evaluation import load_karpathy
    from hqrs_geo.training.data import read_records

    ucm = tmp_path / "sources" / "ucm"
    images = []
    for n, (cls, split) in enumerate([("agricultural", "train"), ("river", "train"), ("river", "val")]):
        _image(ucm / "images" / cls / f"{cls}{n}.jpg", 40 * n)
        images.append({"filename": f"images/{cls}/{cls}{n}.jpg", "class": cls, "split": split,
                       "sentences": [{"raw": f"a {cls} scene ."}]})
    (ucm / "dataset_ucm.json").write_text(json.dumps({"images": images}))
    for cls in ("Farmland", "Parking"):
        _image(tmp_path / "sources" / "aid" / cls / f"{cls.lower()}_1.jpg", 200)
    for cls in ("SeaLake", "PermanentCrop"):  # EuroSAT: 4 per class, 2 trained on, 1 for selection
        for n in range(4):
            _image(tmp_path / "sources" / "eurosat" / cls / f"{cls}_{n}.jpg", 10 * n)
    _image(tmp_path / "sources" / "siri" / "pond" / "0001.tif", 90)
    out = tmp_path / "elsewhere" / "set"
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "build_training_set.py"),
                           "--ucm", str(ucm / "dataset_ucm.json"), "--aid", str(tmp_path / "sources" / "aid"),
                           "--eurosat", str(tmp_path / "sources" / "eurosat"), "--eurosat-per-class", "2",
                           "--eurosat-val", "1",
                           "--holdout-siri", str(tmp_path / "sources" / "siri"), "-o", str(out)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    train = read_records(str(out / "train_clip.json"), ("train",))
    assert {r.label for r in train} == {"farmland", "river", "parking lot", "lake", "orchard"}
    assert sum(r.label == "lake" for r in train) == 2 and sum(r.label == "orchard" for r in train) == 2
    assert all(Path(r.image).is_file() for r in train)
    assert any(len(r.captions) > 2 for r in train if r.label == "parking lot")  # rule captions
    held = load_karpathy(str(out / "holdout_siri.json"), "test")
    assert [(Path(r["image"]).name, r["class"]) for r in held] == [("0001.tif", "pond")]
    val = load_karpathy(str(out / "train_clip.json"), "val")
    assert [r["class"] for r in val] == ["river"] and Path(val[0]["image"]).is_file()
    chosen = load_karpathy(str(out / "val_eurosat.json"), "val")
    assert sorted(r["class"] for r in chosen) == ["lake", "orchard"]
    trained = {Path(r.image).name for r in train if r.label in ("lake", "orchard")}
    assert len(trained) == 4 and all(Path(r["image"]).is_file() for r in chosen)
    assert not trained & {Path(r["image"]).name for r in chosen}  # images training left out


def _build(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "examples" / "build_training_set.py"), *args],
                          capture_output=True, text=True, cwd=cwd)


def test_sydney_holdout_lists_the_images_present_with_their_human_captions(tmp_path):
    from hqrs_geo.evaluation import load_karpathy

    images = tmp_path / "sydney" / "images"
    for n in (1, 3):  # 2.tif is named in the JSON but not there (as in the public copies)
        _image(images / f"{n}.tif", 30 * n)
    entries = [{"filename": f"{n}.tif", "split": split, "imgid": n,
                "sentences": [{"raw": f"caption {k} of image {n} ."} for k in range(5)] + [{"raw": "  "}]}
               for n, split in ((1, "train"), (2, "val"), (3, "test"))]
    entries[2]["class"] = "airport"
    captions = tmp_path / "sydney" / "dataset_sydney.json"
    captions.write_text(json.dumps({"dataset": "sydney", "images": entries}))
    out = tmp_path / "out"
    done = _build("--holdout-sydney", str(captions), str(images), "-o", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert not (out / "train_clip.json").exists()  # no --ucm: only the held-out set
    held = load_karpathy(str(out / "holdout_sydney.json"), "test")
    assert [(Path(r["image"]).name, r["class"]) for r in held] == [("1.tif", None), ("3.tif", "airport")]
    assert all(Path(r["image"]).is_file() for r in held)
    assert held[1]["captions"] == [f"caption {k} of image 3 ." for k in range(5)]
    raw = json.loads((out / "holdout_sydney.json").read_text())["images"]
    assert [r["source_split"] for r in raw] == ["train", "test"]
    manifest = json.loads((out / "manifest.json").read_text())["files"]["holdout_sydney.json"]
    assert manifest["images"] == 2 and manifest["sentences"] == 10


def test_sydney_holdout_with_no_image_present_is_refused_in_one_line(tmp_path):
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"images": [{"filename": "1.tif", "split": "test", "sentences": []}]}))
    (tmp_path / "images").mkdir()
    out = tmp_path / "out"
    done = _build("--holdout-sydney", str(captions), str(tmp_path / "images"), "-o", str(out), cwd=tmp_path)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "none of the 1 images" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (out / "holdout_sydney.json").exists()

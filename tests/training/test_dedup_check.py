"""examples/dedup_check.py: resized, re-encoded, rotated and tiled copies are found; unrelated images are not."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from examples import dedup_check

ROOT = Path(__file__).resolve().parents[2]


def _scene(side: int, seed: int) -> Image.Image:
    """A structured RGB image: smooth noise at three scales plus a few bright rectangles (roofs)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((side, side, 3))
    for cells, weight in ((6, 1.0), (24, 0.6), (96, 0.3)):
        small = Image.fromarray((rng.random((cells, cells, 3)) * 255).astype(np.uint8))
        out += weight * np.asarray(small.resize((side, side), Image.Resampling.BICUBIC), float)
    out /= 1.9
    for _ in range(12):
        x, y = rng.integers(0, side - side // 8, 2)
        out[y:y + side // 12, x:x + side // 10] = rng.integers(150, 255)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def _sets(tmp_path: Path) -> tuple[Path, Path]:
    train, held = tmp_path / "train", tmp_path / "held"
    train.mkdir()
    held.mkdir()
    big = _scene(600, 1)
    big.resize((150, 150), Image.Resampling.BOX).save(train / "aid_like.jpg", quality=80)  # a 600 px set's copy
    _scene(256, 2).save(train / "other.jpg", quality=90)
    _scene(256, 3).save(train / "rotated_source.png")
    big.resize((256, 256), Image.Resampling.LANCZOS).save(held / "resized.jpg", quality=70)
    big.crop((200, 400, 400, 600)).save(held / "tile_3x3.tif")  # a 200 px tile of the 3 x 3 tiling
    big.crop((150, 150, 450, 450)).resize((200, 200)).save(held / "centre_half.png")
    _scene(256, 3).transpose(Image.Transpose.ROTATE_90).save(held / "rotated.png")
    _scene(200, 4).save(held / "unrelated.png")
    return train, held


def test_resized_tiled_and_rotated_copies_are_found_and_an_unrelated_image_is_not(tmp_path):
    train_dir, held_dir = _sets(tmp_path)
    train = dedup_check.list_images("t", train_dir, None, "--train")
    held = dedup_check.list_images("h", held_dir, None, "--held")
    report, sheets = dedup_check.check(train, {"h": held}, dedup_check.crop_views(), max_distance=10,
                                       min_corr=0.9, min_detail=0.7, min_std=4.0)
    found = {(row["held"], row["train"]) for row in report["held_out"]["h"]["verified"]}
    assert found == {("resized.jpg", "aid_like.jpg"), ("tile_3x3.tif", "aid_like.jpg"),
                     ("centre_half.png", "aid_like.jpg"), ("rotated.png", "rotated_source.png")}
    views = {row["held"]: (row["held_view"], row["train_view"]) for row in report["held_out"]["h"]["verified"]}
    assert views["tile_3x3.tif"] == ("whole", "crop 0.33 at (0.33, 0.67)")
    assert views["rotated.png"][0].startswith("whole rot")
    assert report["held_out"]["h"]["held_images_with_a_near_duplicate"] == 4
    assert sheets["h"].startswith(b"\x89PNG")


def test_phash_separates_a_recompressed_copy_from_a_different_image():
    a = np.asarray(_scene(128, 5).convert("L").resize((32, 32), Image.Resampling.BOX), np.float32)
    noisy = a + np.random.default_rng(0).normal(0, 4, a.shape).astype(np.float32)
    other = np.asarray(_scene(128, 6).convert("L").resize((32, 32), Image.Resampling.BOX), np.float32)
    hashes = dedup_check.phash(np.stack([a, noisy, other]))
    distance = dedup_check.hamming(hashes[:1], hashes)[0]
    assert distance[0] == 0 and distance[1] <= 6 and distance[2] >= 16
    assert dedup_check.correlation(a, noisy) > 0.95 > dedup_check.correlation(a, other)


def test_crop_views_cover_quadrants_and_tilings():
    views = set(dedup_check.crop_views())
    assert {(0.5, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, 0.25, 0.25)} <= views  # quadrants and centre
    thirds = {(round(x, 3), round(y, 3)) for s, x, y in views if abs(s - 1 / 3) < 1e-9}
    assert {(0.0, 0.0), (0.333, 0.667), (0.667, 0.667)} <= thirds
    assert all(0 <= x and x + s <= 1 + 1e-9 and 0 <= y and y + s <= 1 + 1e-9 for s, x, y in views)


def test_command_writes_the_report_and_a_sheet_per_set_and_refuses_a_missing_set_in_one_line(tmp_path):
    train_dir, held_dir = _sets(tmp_path)
    script = str(ROOT / "examples" / "dedup_check.py")
    done = subprocess.run([sys.executable, script, "--train", f"t={train_dir}", "--held", f"h={held_dir}",
                           "--sheets", str(tmp_path / "sheets"), "-o", str(tmp_path / "out" / "report.json")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["held_out"]["h"]["near_duplicates"] == 4 and report["training"]["images"] == 3
    assert Image.open(tmp_path / "sheets" / "h.png").size[1] > 4 * dedup_check.CELL
    missing = subprocess.run([sys.executable, script, "--train", f"t={train_dir}", "--held",
                              f"h={tmp_path / 'nowhere.json'}"], capture_output=True, text=True, cwd=tmp_path)
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert "nowhere.json not found" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1


def test_two_shorelines_that_share_only_their_shape_are_not_verified(tmp_path):
    """Water and land split by the same diagonal, with different fine texture: close at 32 px, no shared detail."""
    yy, xx = np.mgrid[0:200, 0:200]
    shore = 60.0 + 140.0 / (1.0 + np.exp(-(xx - yy) / 8.0))  # a soft shoreline, as imaged
    paths = []
    for seed in (1, 2):
        texture = np.random.default_rng(seed).normal(0, 12, shore.shape)
        path = tmp_path / f"shore{seed}.png"
        Image.fromarray(np.clip(shore + texture, 0, 255).astype(np.uint8)).save(path)
        paths.append(dedup_check.Item("s", "s", path.name, str(path)))
    match = dedup_check.Match(0, 0, 0, 0, distance=0)
    dedup_check.verify(match, paths[:1], paths[1:], [])
    assert match.corr is not None and match.corr > 0.9  # the shape alone passes the coarse test
    assert match.detail is not None and match.detail < 0.5
    assert not match.verified(dedup_check.DEFAULT_MIN_CORR, dedup_check.DEFAULT_MIN_DETAIL)


def test_control_copies_are_found_except_the_one_off_the_crop_grid(tmp_path):
    train_dir, _ = _sets(tmp_path)
    train = dedup_check.list_images("t", train_dir, None, "--train")
    items, truth = dedup_check.control_set(train, len(dedup_check.CONTROL_EDITS))
    report, _ = dedup_check.check(train, {"control": items}, dedup_check.crop_views(), max_distance=10,
                                  min_corr=0.9, min_detail=0.7, min_std=4.0)
    recall = dedup_check.control_recall(report["held_out"]["control"]["verified"], items, train, truth)
    findable = sum(ok for _, _, ok in truth)
    assert recall["found_of_findable"] == f"{findable}/{findable}" and findable >= 5
    assert recall["by_edit"]["half crop 10 % off the grid"] == "0/1"  # the documented limit

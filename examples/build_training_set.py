r"""Assemble the hqrs-mini training set: UCM-captions + class-labelled scene sets turned into
captions by rule (``examples/caption_rules.py``), as Karpathy-style JSON for ``hqrs-geo finetune``,
plus the held-out out-of-domain evaluation set as its own JSON.

    python examples/build_training_set.py --ucm ../shared/data/ucm/dataset_ucm.json \
        --aid DATA/aid/AID --holdout-siri "DATA/siri_whu/12class_tif" -o DATA/hqrs17

Writes (in ``-o``; image paths are written absolute, so the JSON reads from anywhere on this machine):

* ``train_clip.json``: split ``train`` = UCM train + unlabelled (their UCM-captions, plus
  ``--ucm-rule-captions`` rule captions each) + every AID image (``--rule-captions`` rule
  captions each); split ``val`` = the UCM val split unchanged (its sentences and its original
  class labels, so that training-time selection measures what ``hqrs-geo eval`` measures on
  ``dataset_ucm.json``). ``class`` of training images is the unified concept of
  ``caption_rules.DATASET_CLASSES`` (one class for UCM "agricultural" and AID "Farmland"...).
* ``train_coca.json``: the same, but UCM images keep only their human captions, and the rule
  captions of the class-labelled sets are plain statements ("There is a bridge over a river.",
  descriptive sentences) rather than image-description prompts; UCM ``unlabelled`` images are
  left out (no human captions).

UCM training images are listed ``--ucm-repeat`` times (2; ``--coca-ucm-repeat`` 3 in
train_coca.json), to weigh the small human-captioned set against the larger class-labelled ones.
* ``holdout_siri.json``: the held-out set (split ``test``, original class names, no sentences)
  for ``hqrs-geo eval zeroshot holdout_siri.json --split test``. Never used for training or
  model selection.
* ``val_eurosat.json`` (with ``--eurosat-val N``): N EuroSAT images per class from those the training
  subset left out (split ``val``, unified concept names): a second selection set from a source other
  than UCM, so that choosing between models does not look at UCM alone, nor at the held-out set.
* ``holdout_sydney.json`` (with ``--holdout-sydney CAPTIONS_JSON IMAGES_DIR``): a held-out captioned
  set, split ``test``: the Sydney-captions images that exist in ``IMAGES_DIR`` with their five human
  captions (and their class, where the captions JSON gives one). Only 9 of the 613 images are
  obtainable; the set measures captions on imagery the models never saw, and chooses nothing.
* ``manifest.json``: counts per source and class, the options, and a sha256 of each JSON.

Everything is deterministic (captions are drawn with a RNG seeded by the image's path).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from caption_rules import CONCEPTS, DATASET_CLASSES, rule_captions  # noqa: E402

from hqrs_geo.atomic import write_text  # noqa: E402

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}


def _seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def _absolute(path: Path) -> str:
    """The image's absolute path (``hqrs-geo`` refuses relative names that leave ``out``)."""
    return str(path.resolve())


def class_folders(root: Path) -> list[tuple[str, Path]]:
    """(class folder name, image path) for every image under ``root/<class>/``, sorted."""
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for image in sorted(folder.iterdir()):
            if image.suffix.lower() in IMAGE_SUFFIXES:
                found.append((folder.name, image))
    if not found:
        raise SystemExit(f"{root}: no class folders with images")
    return found


def ucm_records(path: Path, out: Path, rule_n: int, for_coca: bool, repeat: int = 1) -> list[dict]:
    data = json.loads(path.read_text())
    mapping = DATASET_CLASSES["ucm"]
    records = []
    for item in data["images"]:
        image = path.parent / item["filename"]
        sentences = [s["raw"].strip() for s in item.get("sentences", []) if s.get("raw", "").strip()]
        if item["split"] == "val":  # model selection only: unchanged
            records.append({"filename": _absolute(image), "class": item["class"], "split": "val",
                            "source": "ucm", "sentences": [{"raw": s} for s in sentences]})
            continue
        if item["split"] not in ("train", "unlabelled"):
            continue
        if for_coca and not sentences:
            continue
        concept = mapping[item["class"]]
        extra = []
        if not for_coca:
            rng = random.Random(_seed("ucm/" + item["filename"]))
            # the UCM label itself ("baseballdiamond") is one of the names: the zero-shot
            # protocol on dataset_ucm.json prompts with it
            n = rule_n if sentences else max(rule_n, 5)
            extra = rule_captions(concept, rng, n, extra_names=(item["class"],))
        records += [{"filename": _absolute(image), "class": concept, "split": "train", "source": "ucm",
                     "source_class": item["class"], "sentences": [{"raw": s} for s in sentences + extra]}] * repeat
    return records


def seeded_subset(name: str, found: list[tuple[str, Path]], per_class: int,
                  skip: int = 0) -> list[tuple[str, Path]]:
    """``per_class`` images of each class, after the first ``skip``, in an order fixed by a hash of the names."""
    ranked = sorted(found, key=lambda f: _seed(f"{name}/{f[0]}/{f[1].name}"))
    seen = Counter[str]()
    chosen = set()
    for folder, image in ranked:
        seen[folder] += 1
        if skip < seen[folder] <= skip + per_class:
            chosen.add(image)
    return [f for f in found if f[1] in chosen]


def labelled_records(name: str, root: Path, out: Path, rule_n: int, style: str,
                     per_class: int | None = None) -> list[dict]:
    mapping = DATASET_CLASSES[name]
    found = class_folders(root)
    if per_class is not None:  # a fixed, seeded subset of each class
        found = seeded_subset(name, found, per_class)
    records = []
    for folder, image in found:
        if folder not in mapping:
            raise SystemExit(f"{root}: class folder {folder!r} has no rule in caption_rules.DATASET_CLASSES[{name!r}]")
        concept = mapping[folder]
        rng = random.Random(_seed(f"{name}/{folder}/{image.name}"))
        captions = rule_captions(concept, rng, rule_n, style=style)
        records.append({"filename": _absolute(image), "class": concept, "split": "train", "source": name,
                        "source_class": folder, "sentences": [{"raw": c} for c in captions]})
    return records


def selection_records(name: str, root: Path, per_class: int, skip: int) -> list[dict]:
    """Images of a labelled set that its training subset (the first ``skip`` per class) left out."""
    mapping = DATASET_CLASSES[name]
    return [{"filename": _absolute(image), "class": mapping[folder], "split": "val", "source": name,
             "source_class": folder, "sentences": []}
            for folder, image in seeded_subset(name, class_folders(root), per_class, skip)]


def holdout_records(root: Path, out: Path) -> list[dict]:
    return [{"filename": _absolute(image), "class": folder.lower(), "split": "test", "source": "siri-whu",
             "sentences": []} for folder, image in class_folders(root)]


def sydney_records(captions: Path, images: Path) -> list[dict]:
    """Held-out records (split ``test``) of the Sydney-captions images present in ``images``.

    ``captions`` is the Karpathy-style JSON of the full set (``dataset_sydney*.json``); an entry
    whose image file is missing is left out (the public copies hold only a few of the images).
    Each record keeps the human captions, the image's class where the JSON gives one, and its
    split in the original JSON (``source_split``): it is evaluated on, never trained on.
    """
    try:
        data = json.loads(captions.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise SystemExit(f"{captions}: cannot read a Karpathy-style captions JSON ({exc}); "
                         "give dataset_sydney*.json") from None
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise SystemExit(f"{captions}: not a Karpathy-style JSON ('images' must be a list)")
    if not images.is_dir():
        raise SystemExit(f"{images}: not a folder; give the folder that holds the Sydney images (1.tif...)")
    records = []
    for number, item in enumerate(entries):
        if not isinstance(item, dict) or not isinstance(item.get("filename"), str):
            raise SystemExit(f"{captions}: images[{number}] has no filename")
        image = images / item["filename"]
        if not image.is_file():
            continue
        sentences = [s["raw"].strip() for s in item.get("sentences", [])
                     if isinstance(s, dict) and isinstance(s.get("raw"), str) and s["raw"].strip()]
        record = {"filename": _absolute(image), "split": "test", "source": "sydney-captions",
                  "source_split": item.get("split"), "sentences": [{"raw": s} for s in sentences]}
        if item.get("class") is not None:
            record["class"] = str(item["class"])
        records.append(record)
    if not records:
        raise SystemExit(f"{images}: none of the {len(entries)} images named in {captions} is there; "
                         "check the two paths")
    return records


def write(path: Path, name: str, images: list[dict]) -> str:
    payload = {"dataset": name, "images": images}
    text = json.dumps(payload, indent=1)
    write_text(path, text)
    return hashlib.sha256(text.encode()).hexdigest()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ucm", type=Path,
                        help="UCM-captions Karpathy JSON (dataset_ucm.json); without it only the held-out sets are "
                             "written")
    parser.add_argument("--aid", type=Path, help="AID root: one folder per class")
    parser.add_argument("--eurosat", type=Path, help="EuroSAT RGB root (2750/: one folder per class)")
    parser.add_argument("--eurosat-per-class", type=int, default=1000,
                        help="EuroSAT images per class (a seeded subset; the set has 2000-3000 each) [1000]")
    parser.add_argument("--eurosat-val", type=int, default=0,
                        help="write val_eurosat.json: this many EuroSAT images per class that training left out [0]")
    parser.add_argument("--holdout-siri", type=Path, help="SIRI-WHU root (12 class folders): held-out eval set")
    parser.add_argument("--holdout-sydney", nargs=2, type=Path, metavar=("CAPTIONS_JSON", "IMAGES_DIR"),
                        help="write holdout_sydney.json: the Sydney-captions images present in IMAGES_DIR with "
                             "their human captions (split test): a held-out captioned set")
    parser.add_argument("-o", "--output", required=True, type=Path)
    parser.add_argument("--rule-captions", type=int, default=5, help="rule captions per class-labelled image [5]")
    parser.add_argument("--ucm-rule-captions", type=int, default=2,
                        help="rule captions added to each captioned UCM image in train_clip.json [2]")
    parser.add_argument("--ucm-repeat", type=int, default=2,
                        help="times each UCM training image is listed in train_clip.json (weighs UCM against the "
                             "larger sets) [2]")
    parser.add_argument("--coca-ucm-repeat", type=int, default=3,
                        help="the same for train_coca.json (its only human captions) [3]")
    args = parser.parse_args(argv)
    if not (args.ucm or args.holdout_siri or args.holdout_sydney):
        parser.error("nothing to write: give --ucm (training sets) and/or --holdout-siri / --holdout-sydney")
    if not args.ucm and (args.aid or args.eurosat):
        parser.error("--aid and --eurosat need --ucm (the training sets are built around UCM)")
    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    unknown = {c for m in DATASET_CLASSES.values() for c in m.values()} - set(CONCEPTS)
    if unknown:
        raise SystemExit(f"caption_rules: concepts without rules: {sorted(unknown)}")

    manifest: dict = {"options": {k: str(v) for k, v in vars(args).items()}, "files": {}}
    built = []
    if args.ucm:
        labelled = [("aid", args.aid, None), ("eurosat", args.eurosat, args.eurosat_per_class)]
        clip = ucm_records(args.ucm, out, args.ucm_rule_captions, False, args.ucm_repeat)
        coca = ucm_records(args.ucm, out, 0, True, args.coca_ucm_repeat)
        for name, root, per_class in labelled:
            if root:
                clip += labelled_records(name, root, out, args.rule_captions, "clip", per_class)
                coca += labelled_records(name, root, out, args.rule_captions, "caption", per_class)
        built = [("train_clip", clip), ("train_coca", coca)]
    for name, images in built:
        manifest["files"][f"{name}.json"] = {
            "sha256": write(out / f"{name}.json", name, images),
            "splits": dict(Counter(i["split"] for i in images)),
            "train_by_source": dict(Counter(i["source"] for i in images if i["split"] == "train")),
            "train_sentences": sum(len(i["sentences"]) for i in images if i["split"] == "train"),
            "train_classes": dict(sorted(Counter(i["class"] for i in images if i["split"] == "train").items())),
        }
    if args.eurosat and args.eurosat_val:
        chosen = selection_records("eurosat", args.eurosat, args.eurosat_val, args.eurosat_per_class)
        manifest["files"]["val_eurosat.json"] = {
            "sha256": write(out / "val_eurosat.json", "eurosat (selection, not trained on)", chosen),
            "images": len(chosen), "classes": dict(sorted(Counter(i["class"] for i in chosen).items())),
        }
    if args.holdout_siri:
        held = holdout_records(args.holdout_siri, out)
        manifest["files"]["holdout_siri.json"] = {
            "sha256": write(out / "holdout_siri.json", "siri-whu (held out)", held),
            "images": len(held), "classes": dict(sorted(Counter(i["class"] for i in held).items())),
        }
    if args.holdout_sydney:
        held = sydney_records(*args.holdout_sydney)
        manifest["files"]["holdout_sydney.json"] = {
            "sha256": write(out / "holdout_sydney.json", "sydney-captions (held out)", held),
            "images": len(held), "sentences": sum(len(i["sentences"]) for i in held),
            "classes": dict(sorted(Counter(i.get("class", "") for i in held).items())),
        }
    write_text(out / "manifest.json", json.dumps(manifest, indent=2))
    for name, info in manifest["files"].items():
        print(name, {k: v for k, v in info.items() if k not in ("train_classes", "classes")})


if __name__ == "__main__":
    main()

"""How often the zero-shot scene class is right, alone and when the caption model agrees or not.

    python benchmarks/class_agreement.py [--dataset ../shared/data/ucm/dataset_ucm.json] [--split val]
                                         [--lead beam|consensus] [--json OUT]

MpGI states a tile's zero-shot class as a checked fact. This measures when that is safe, on a
labelled split (default: UCM-captions val, 210 images, a selection set): for each image the top
class of the CLIP's zero-shot over :data:`~hqrs_geo.models.prompts.SCENE_CLASSES` (the class
stage of MpGI: :func:`~hqrs_geo.models.zeroshot.zero_shot`, calibrated probabilities) and the
caption model's caption (``--lead beam``: beam 3; ``consensus``: the pick of the consensus pool,
the lead MpGI takes when no confident class guides it), then the precision of the top class (right: the
same entry of the synonym table as the image's label, or one names the other) by probability
and by what the caption says: names the same class, names another class
(:func:`~hqrs_geo.mpgi.integrate.rival_class`) or none.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATASET = ROOT.parent / "shared" / "data" / "ucm" / "dataset_ucm.json"
CHUNK = 30


def rows_of(dataset: Path, split: str, lead: str = "beam") -> list[dict]:
    """One row per image: label, top class, its probability, the caption and what it names."""
    import torch

    from hqrs_geo.engine.tasks import CaptionTask
    from hqrs_geo.evaluation import load_karpathy
    from hqrs_geo.models.encode import image_batch_vectors, read_image
    from hqrs_geo.models.loader import load_model
    from hqrs_geo.models.prompts import class_prompt_name, synonym_key
    from hqrs_geo.models.zeroshot import zero_shot
    from hqrs_geo.mpgi.integrate import names_class, rival_class

    records = [r for r in load_karpathy(str(dataset), split) if r.get("class")]
    clip = load_model("hqrs-mini-clip", device="cpu")
    labeller = zero_shot(clip, None, top_k=1)
    task = CaptionTask(load_model("hqrs-mini-coca", device="cpu"))
    rows = []
    for start in range(0, len(records), CHUNK):
        chunk = records[start:start + CHUNK]
        images = torch.stack([torch.from_numpy(read_image(r["image"], 256)).permute(2, 0, 1) for r in chunk])
        probabilities = labeller.probabilities(image_batch_vectors(clip, images))
        captions = task(images) if lead == "beam" else [pool[0] for pool in task.candidates(images)]
        for record, p, caption in zip(chunk, probabilities, captions):
            j = int(np.argmax(p))
            top, truth = labeller.labels[j], class_prompt_name(record["class"])
            rows.append({"label": record["class"], "top": top, "p": float(p[j]), "caption": caption,
                         "names": names_class(caption, top), "rival": rival_class(caption, top, labeller.labels),
                         "right": bool(synonym_key(top) == synonym_key(truth) or names_class(truth, top)
                                          or names_class(top, truth))})
    return rows


def precision(rows: list[dict]) -> tuple[int, float]:
    """``(count, share right)``."""
    return len(rows), (sum(r["right"] for r in rows) / len(rows) if rows else float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=str(DATASET))
    parser.add_argument("--split", default="val")
    parser.add_argument("--lead", choices=("beam", "consensus"), default="beam",
                        help="the caption compared: beam 3 (default) or the consensus pool's pick")
    parser.add_argument("--json", default=None, help="write every row and the table to this file")
    args = parser.parse_args()
    rows = rows_of(Path(args.dataset), args.split, args.lead)
    table = {"top class, any p": precision(rows)}
    for floor in (0.5, 0.7, 0.9):
        sure = [r for r in rows if r["p"] >= floor]
        table[f"p >= {floor}"] = precision(sure)
        table[f"p >= {floor}, the caption names it"] = precision([r for r in sure if r["names"]])
        table[f"p >= {floor}, the caption names no class"] = precision([r for r in sure if not r["names"]
                                                                        and not r["rival"]])
        table[f"p >= {floor}, the caption names another class"] = precision([r for r in sure if not r["names"]
                                                                             and r["rival"]])
    for low, high in ((0.3, 0.5), (0.2, 0.3), (0.0, 0.2)):
        band = [r for r in rows if low <= r["p"] < high]
        table[f"{low} <= p < {high}"] = precision(band)
        table[f"{low} <= p < {high}, the caption names it"] = precision([r for r in band if r["names"]])
    print(f"{len(rows)} images of {Path(args.dataset).name} ({args.split}); zero-shot hqrs-mini-clip, "
          f"captions hqrs-mini-coca ({'beam 3' if args.lead == 'beam' else 'consensus pick'})")
    print(f"{'top zero-shot class':50s} {'images':>6s} {'right':>6s}")
    for name, (count, share) in table.items():
        print(f"{name:50s} {count:6d} {share * 100:5.1f}%")
    if args.json:
        Path(args.json).write_text(json.dumps({"table": table, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

"""Average precision of the demo's text queries on the labelled demo scene.

    python benchmarks/demo_ap.py [--model hqrs-mini-clip] [--checkpoint FILE] [--arch ARCH]
                                 [--template "an aerial image of {}."] [--views 1|8|16] [--json OUT]

Tiles ``examples/data/urban_river_025m_epsg28992.tif`` exactly as ``examples/demo.py`` does
(64 m tiles, 50 % overlap: 49 tiles), embeds every tile with the model (``hqrs_geo.embed``,
the product path), ranks all tiles for each demo query with a :class:`hqrs_geo.SearchSession`
and scores the ranking against the per-tile labels of ``examples/data/urban_river_labels.json``:
average precision (AP, the mean over the positive tiles of the precision at their rank) per
query and its mean (mAP). Chance level is each label's share of positive tiles.

``--template`` fixes the prompt template (default: the model's own, as the demo uses it), so
two models can be compared with the same prompt.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCENE = ROOT / "examples" / "data" / "urban_river_025m_epsg28992.tif"
LABELS = ROOT / "examples" / "data" / "urban_river_labels.json"


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """Non-interpolated AP of a ranking by descending score (ties in tile order)."""
    order = np.argsort(-scores, kind="stable")
    hits = positive[order].astype(bool)
    if not hits.any():
        return float("nan")
    precision_at_hit = np.cumsum(hits)[hits] / (np.flatnonzero(hits) + 1)
    return float(precision_at_hit.mean())


def tile_scene(folder: Path) -> Path:
    """The demo's tiling of the demo scene, as a GeoPackage layer."""
    from hqrs_geo import TileConfig
    from hqrs_geo.api import tile

    layer = folder / "tiles.gpkg"
    tile(str(SCENE), layer, TileConfig(tile_size="64m", overlap="50%"))
    return layer


def demo_ap(model: str, checkpoint=None, arch=None, template=None, views: int = 1) -> dict:
    import hqrs_geo as hg
    from hqrs_geo.engine.options import RunOptions
    from hqrs_geo.models.encode import text_vectors

    labels = json.loads(LABELS.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        layer = tile_scene(Path(tmp))
        hg.embed(str(layer), model=model, checkpoint=checkpoint, arch=arch, options=RunOptions(views=views))
        session = hg.SearchSession(str(layer))
        ids = list(session.index.ids)
        missing = set(labels["tiles"]) ^ set(ids)
        if missing:
            raise SystemExit(f"tiles and labels differ: {sorted(missing)[:3]}...")
        matrix = np.asarray(session.index.matrix, dtype=np.float32)
        out = {"model": model, "checkpoint": checkpoint, "arch": arch, "views": views,
               "template": template or session.source.template, "tiles": len(ids), "queries": {}}
        for query, label in labels["queries"].items():
            if template:
                vector = text_vectors(session.model, [query], [template])[0]
            else:
                vector = session.text_query(query)
            scores = matrix @ vector
            positive = np.array([labels["tiles"][t][label] for t in ids])
            top = [ids[i] for i in np.argsort(-scores, kind="stable")[:3]]
            out["queries"][query] = {"label": label, "positives": int(positive.sum()),
                                     "chance": float(positive.mean()), "AP": average_precision(scores, positive),
                                     "top3": top}
    out["mAP"] = float(np.mean([q["AP"] for q in out["queries"].values()]))
    out["chance_mAP"] = float(np.mean([q["chance"] for q in out["queries"].values()]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="hqrs-mini-clip")
    parser.add_argument("--checkpoint")
    parser.add_argument("--arch")
    parser.add_argument("--template", help='prompt template, e.g. "an aerial image of {}." (default: the model\'s)')
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--views", type=int, default=1, choices=(1, 8, 16), help="test-time views (embed --views)")
    args = parser.parse_args()
    result = demo_ap(args.model, args.checkpoint, args.arch, args.template, args.views)
    print(f"model {result['model']}  template {result['template']!r}  views {args.views}  ({result['tiles']} tiles)")
    for query, q in result["queries"].items():
        print(f"  {query!r:32} AP {q['AP']:.3f}  (chance {q['chance']:.3f}, {q['positives']} positive tiles)")
    print(f"  mean AP {result['mAP']:.3f}  (chance {result['chance_mAP']:.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

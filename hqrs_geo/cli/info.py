"""``hqrs-geo info`` (facts of a raster) and ``hqrs-geo models`` (the model registry)."""
from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import InputError
from ..models.checkpoints import bundled_checkpoint, cache_dir, cached_checkpoint
from ..models.registry import default_caption_model, default_embed_model, list_models
from ..raster.catalog import entry_for, gdal_path
from ..raster.integrity import check_pixel_data
from ..raster.scene import describe, open_raster
from .options import add_progress_options


def register(sub: Any) -> None:
    """Add the ``info`` and ``models`` commands."""
    info = sub.add_parser("info", help="describe a raster (size, CRS, bands, resolution, masks, overviews)")
    info.add_argument("raster")
    info.add_argument("--json", action="store_true", help="print JSON")
    add_progress_options(info)
    info.set_defaults(func=run_info)

    models = sub.add_parser("models", help="list the model registry and which checkpoints are present")
    models.add_argument("--json", action="store_true", help="print JSON")
    add_progress_options(models)
    models.set_defaults(func=run_models_list)


def run_info(args: argparse.Namespace, progress: Any) -> int:
    """``hqrs-geo info``: print the facts of one raster; a raster whose pixel data is cut short
    or damaged (:func:`~hqrs_geo.raster.integrity.check_pixel_data`) gets its facts printed with
    an ``integrity`` line, then the one-line error and exit status 2."""
    raster = str(args.raster)
    if raster.startswith(("http://", "https://", "s3://", "gs://", "az://")):  # a URL: read as a tile job reads it
        raster = entry_for(gdal_path(raster)).path
    damage: InputError | None = None
    with open_raster(raster) as src:
        info = describe(src)
        try:
            check_pixel_data(src, raster)
        except InputError as err:
            damage = err
    if args.json:
        print(json.dumps({**info.as_dict(), "integrity": str(damage) if damage else "ok"}, indent=2, default=str))
        if damage:
            raise damage
        return 0
    res = info.pixel_size
    lines = [
        f"file:        {info.path} ({info.driver})",
        f"size:        {info.width} x {info.height} px, {info.count} band(s), {', '.join(sorted(set(info.dtypes)))}",
        f"crs:         {info.crs or 'none (pixel coordinates only)'}",
        f"resolution:  {res[0]:.6g} x {res[1]:.6g} CRS units"
        + (f" ({info.pixel_size_m[0]:.4g} x {info.pixel_size_m[1]:.4g} m)" if info.pixel_size_m else ""),
        f"bounds:      {', '.join(f'{b:.6f}' for b in info.bounds)}",
        f"bands:       {', '.join(info.colorinterp)}",
        f"nodata/mask: nodata={info.nodata}; flags "
        + "; ".join(f"b{i + 1}:{'+'.join(f)}" for i, f in enumerate(info.mask_flags)),
        f"overviews:   {', '.join(map(str, info.overviews)) or 'none'}",
        f"blocks:      {info.block_shapes[0][1]} x {info.block_shapes[0][0]}, compression {info.compression or 'none'}",
    ]
    if info.has_gcps and not info.crs:
        lines.append("note:        georeferenced by GCPs only; warp it (gdalwarp) before tiling")
    lines.append(f"integrity:   {'DAMAGED (see the error below)' if damage else 'ok (block offsets, sample decoded)'}")
    print("\n".join(lines))
    if damage:
        raise damage
    return 0


def run_models_list(args: argparse.Namespace, progress: Any) -> int:
    """``hqrs-geo models``: the registry and which checkpoints are on this machine."""
    defaults = {default_embed_model(), default_caption_model()}
    rows = []
    for spec in list_models():
        try:
            found = bundled_checkpoint(spec) or cached_checkpoint(spec)
        except InputError:
            found = None
        rows.append({**spec.as_dict(), "present": str(found) if found else None, "default": spec.name in defaults})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<22} {'kind':<5} {'arch':<16} {'checkpoint':<10} source")
    for row in rows:
        source = f"hf-hub {row['hf_repo']}/{row['hf_file']}" if row["hf_repo"] else (row["obtain"] or "built in")
        if row["bundled"]:
            source = "shipped in the package: small DEMO model, not HQRS-CLIP/RS-CoCa"
        name = row["name"] + (" *" if row["default"] else "")
        present = "present" if row["present"] else "missing"
        print(f"{name:<22} {row['kind']:<5} {row['arch']:<16} {present:<10} {source}")
    print("* default when no model is named ($HQRS_GEO_EMBED_MODEL / $HQRS_GEO_CAPTION_MODEL change it)")
    print(f"checkpoints are looked for in {cache_dir()} (set HQRS_GEO_HOME to move it); "
          "any open_clip architecture works with --checkpoint")
    return 0

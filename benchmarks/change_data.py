"""Prepare the labelled bi-temporal change-detection pairs for ``benchmarks/change.py``.

    python benchmarks/change_data.py SOURCE OUT

SOURCE is a checkout (or a bare git directory) of https://github.com/wgcban/ChangeFormer, the
public repository that ships, beside its code, labelled sample pairs of two change-detection
sets as PNG files (256 x 256 px, before ``A/``, after ``B/``, binary change mask ``label/``):

* ``samples_LEVIR``: pairs cut from LEVIR-CD (Chen & Shi, Remote Sensing 12(10):1662, 2020;
  Google Earth, 0.5 m, building change),
* ``samples_DSIFN``: pairs cut from DSIFN-CD (Zhang et al., ISPRS J. 166:183-200, 2020;
  Google Earth, six Chinese cities, land-cover change).

OUT receives one folder per set (``levir-cd/``, ``dsifn-cd/``), each with ``A/``, ``B/`` and
``label/`` holding only the complete pairs (before, after and mask present, RGB, same size), and
``SOURCE.json`` with the repository, the commit and the counts. Nothing is written into this
repository: keep OUT outside it (the sets' licences do not allow redistribution here). See
docs/change-data.md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPOSITORY = "https://github.com/wgcban/ChangeFormer"
SETS = {"samples_LEVIR": "levir-cd", "samples_DSIFN": "dsifn-cd"}


def _is_git_dir(path: Path) -> bool:
    return (path / "HEAD").is_file() and (path / "objects").is_dir()


def _commit(source: Path) -> str:
    flag = "--git-dir" if _is_git_dir(source) else "-C"
    try:
        return subprocess.run(["git", flag, str(source), "rev-parse", "HEAD"], check=True, capture_output=True,
                              text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _export(source: Path, folder: Path) -> Path:
    """A folder holding the sample folders of ``source`` (a checkout as it is; a bare git
    directory exported with ``git archive`` into ``folder``)."""
    if not _is_git_dir(source):
        return source
    try:
        archive = subprocess.run(["git", "--git-dir", str(source), "archive", "HEAD", *SETS], check=True,
                                 capture_output=True).stdout
    except subprocess.CalledProcessError as exc:
        message = exc.stderr.decode(errors="replace").strip().splitlines()
        raise SystemExit(f"{source}: cannot export {', '.join(SETS)} ({message[0] if message else 'git failed'}); "
                         f"give a checkout of {REPOSITORY}") from None
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def _complete_pairs(root: Path) -> list[str]:
    """Names present in A, B and label whose images are RGB and of one size."""
    from PIL import Image

    names = []
    for label in sorted((root / "label").glob("*.png")):
        a, b = root / "A" / label.name, root / "B" / label.name
        if not (a.is_file() and b.is_file()):
            continue
        with Image.open(a) as ia, Image.open(b) as ib, Image.open(label) as il:
            if ia.mode == ib.mode == "RGB" and ia.size == ib.size == il.size:
                names.append(label.name)
    return names


def prepare(source: Path, out: Path) -> dict:
    """Copy the complete labelled pairs of ``source`` into ``out``; returns the summary written
    to ``out/SOURCE.json``."""
    from PIL import Image

    from hqrs_geo.atomic import atomic_path

    if not source.exists():
        raise SystemExit(f"{source}: not found; clone {REPOSITORY} and give its folder")
    summary: dict = {"repository": REPOSITORY, "commit": _commit(source), "sets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = _export(source, Path(tmp))
        for folder, name in SETS.items():
            if not (root / folder / "label").is_dir():
                raise SystemExit(f"{source}: has no {folder}/label; give a checkout of {REPOSITORY}")
            names = _complete_pairs(root / folder)
            target, partial = out / name, out / f".{name}.partial"  # a set appears whole or not at all
            shutil.rmtree(partial, ignore_errors=True)
            changed = pixels = 0
            size = None
            for sub in ("A", "B", "label"):
                (partial / sub).mkdir(parents=True)
                for n in names:
                    shutil.copyfile(root / folder / sub / n, partial / sub / n)
            for n in names:
                with Image.open(partial / "label" / n) as im:
                    mask = np.asarray(im) > 0
                size = list(mask.shape[::-1])
                changed += int(mask.sum())
                pixels += mask.size
            shutil.rmtree(target, ignore_errors=True)
            partial.rename(target)
            summary["sets"][name] = {"from": folder, "pairs": len(names), "size_px": size, "pixels": pixels,
                                     "changed_share": changed / pixels if pixels else 0.0}
    with atomic_path(out / "SOURCE.json") as tmp_file:
        Path(tmp_file).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help=f"checkout (or bare git directory) of {REPOSITORY}")
    parser.add_argument("out", type=Path, help="folder to write the sets to (outside this repository)")
    args = parser.parse_args()
    summary = prepare(args.source, args.out)
    for name, s in summary["sets"].items():
        print(f"{name}: {s['pairs']} pairs of {s['size_px'][0]} x {s['size_px'][1]} px, "
              f"{100 * s['changed_share']:.1f} % changed pixels -> {args.out / name}")
    print(f"source {summary['repository']} @ {summary['commit']}")


if __name__ == "__main__":
    sys.exit(main())

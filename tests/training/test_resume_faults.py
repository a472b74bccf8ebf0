"""``finetune --resume`` over a checkpoint this trainer did not write: a pickle that would run
code, a cut-short archive, a torch file of something else. Each is a one-line error naming the
file, and nothing in it runs (counted in the archive fault suite)."""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import pytest
from archive_report import record
from fork_runner import run_cli
from test_training import _config, _write_dataset
from tiny_models import TINY_CLIP

from hqrs_geo.errors import InputError
from hqrs_geo.training import finetune


class Planted:
    """Unpickling this runs ``os.system`` (the code a foreign pickle could hold)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(output: Path, kind: str, marker: Path) -> Path:
    path = output / "checkpoints" / "step-0000009.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "code pickle":
        path.write_bytes(pickle.dumps({"model": Planted(marker)}))
    elif kind == "code pickle in a torch zip":
        import torch

        torch.save({"model": Planted(marker)}, path)
    elif kind == "cut short":
        import torch

        torch.save({"model": {}, "optimizer": {}, "state": {}, "config": "{}"}, path)
        os.truncate(path, path.stat().st_size // 2)
    elif kind == "another torch file":
        import torch

        torch.save({"weights": torch.zeros(3)}, path)
    elif kind == "empty zip":
        with zipfile.ZipFile(path, "w"):
            pass
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return _write_dataset(tmp_path_factory.mktemp("resume_captions"), per_class=6)


@pytest.mark.parametrize("kind", ["code pickle", "code pickle in a torch zip", "cut short", "another torch file",
                                  "empty zip"])
def test_resume_over_a_foreign_checkpoint_is_a_one_line_error_and_runs_nothing(dataset, tmp_path, kind,
                                                                               model_environment):
    output, marker = tmp_path / "run", tmp_path / "ran"
    path = plant(output, kind, marker)
    with pytest.raises(InputError) as caught:
        finetune(_config(dataset, output, max_steps=1, batch_size=4), resume=True)
    text = str(caught.value)
    ok = "\n" not in text and str(path) in text and "not loaded" in text
    record(clean=int(ok), internal=int(not ok), data_lost=int(marker.exists()))
    assert ok, text
    assert not marker.exists()  # the pickle's code did not run


def test_resume_cli_names_the_file_in_one_line(dataset, tmp_path, model_environment):
    output, marker = tmp_path / "run", tmp_path / "ran"
    path = plant(output, "code pickle", marker)
    done = run_cli("finetune", str(dataset), "-o", str(output), "--arch", TINY_CLIP, "--max-steps", "1",
                   "--batch-size", "4", "--resume", "--device", "cpu")
    ok = done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and str(path) in done.stderr
    record(clean=int(ok), internal=int("Traceback" in done.stderr or "internal error" in done.stderr))
    assert ok, done.stderr
    assert not marker.exists()

"""The model engine: tasks computed per batch of tiles (:mod:`.tasks`), the job that runs them
over a layer (:mod:`.run`) with its settings (:mod:`.options`), and the resume store
(:mod:`.store`) that makes long jobs resumable."""
from .options import RunOptions
from .run import run_models

__all__ = ["RunOptions", "run_models"]

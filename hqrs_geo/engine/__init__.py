"""The model engine: tasks computed per batch of tiles (:mod:`.tasks`), the job that runs them
over a layer (:mod:`.run`) with its settings (:mod:`.options`), and the resume store
(:mod:`.store`) that makes long jobs resumable.

The package itself imports only the settings: reading options (the command line, a Ray driver)
never loads the model engine.
"""
from .options import RunOptions

__all__ = ["RunOptions"]

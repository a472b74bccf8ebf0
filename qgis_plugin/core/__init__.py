"""What the Processing algorithms and the widgets share, with no GUI of its own: ``settings``,
``runner`` (the one process runner and error parser), ``engine`` (the interpreter and its probe),
``sessions`` (search processes), ``installer`` (the engine's environment), ``tasks`` (QgsTasks),
``tile_layers``, ``rasters``, ``styles`` and ``registry`` (generated from the engine's registry)."""

"""``python -m hqrs_geo`` runs the ``hqrs-geo`` command line."""
from .cli import main

raise SystemExit(main())

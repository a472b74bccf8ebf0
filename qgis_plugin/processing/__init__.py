"""The HQRS Processing provider: ``provider`` (the provider), ``base`` (what every algorithm
shares: the engine run, inputs, outputs), ``params`` (parameter sets and their CLI flags) and
``algorithms`` (one class per algorithm)."""

"""`fedscan bench ...`: reproducible measurements behind the figures in README.

Each benchmark module exposes ``add_arguments(parser)`` and ``run(args) -> int`` and imports
its heavy dependencies (torch, the daemon) only inside ``run``.
"""

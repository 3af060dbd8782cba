"""`fedscan bench federation`: the command (``command``) and its parts, each its own module.

``wire_bytes`` (bytes per update and codec), ``accuracy`` (codec cost in accuracy),
``aggregate`` (coordinator memory and time per node count), ``rounds`` (real rounds over
Mosquitto with node processes, ``node`` being the light node they run), ``swarm`` (many
simulated nodes on one broker); ``common`` holds machine facts, the broker and the coordinator
process.
"""

"""The node's side of the federation: the MQTT client, sending updates, receiving and
verifying global models, privacy of what leaves the node, refusing bad models."""

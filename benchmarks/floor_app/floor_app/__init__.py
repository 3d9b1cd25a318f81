"""Flower's floor: a numpy-only FedAvg round (see ../pyproject.toml)."""

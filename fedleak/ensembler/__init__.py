"""Ensembler (Liu et al., 2024) on fedleak: training, baselines, the server's inversion attack.

- ``config``: presets (``presets/*.toml``) with ``--set`` overrides.
- ``data``: the client's training images, the attacker's auxiliary images, the evaluation images.
- ``training``: stage 1 (N noisy nets, Eq. 2) and stage 2 (new head and tail, Eq. 3).
- ``baselines``: NONE, Shredder-style, Single, DR-single, DR-ensemble as client/server splits.
- ``experiment``: one preset end to end through a real server process; ``report``: the page.
- ``cli``: ``fedleak ensembler train|serve|classify|attack|run``.
"""

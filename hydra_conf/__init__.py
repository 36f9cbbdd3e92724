"""Hydra's configs of orchestrator. Installed as the package `orchestrator.hydra_conf` (pyproject.toml), which
`python -m orchestrator` reads through Hydra's pkg:// search path, so an installed copy finds its own configs."""

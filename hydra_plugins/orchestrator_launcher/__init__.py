"""Hydra instantiates launchers only from the `hydra_plugins` package: this is launch.sweep's launcher under
that name (hydra_conf/hydra/launcher/ray_trials.yaml selects it). Hydra imports this module whenever it
starts, so it stays light: launch.sweep imports Ray and torch only when a sweep runs."""

from launch.sweep import RayTrialLauncher as _RayTrialLauncher


class RayTrialLauncher(_RayTrialLauncher):
    """See launch/sweep.py."""

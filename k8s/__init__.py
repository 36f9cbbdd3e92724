"""The KubeRay templates of launcher=rayjob. Installed as the package `orchestrator.k8s` (pyproject.toml), so an
installed copy renders from its own templates (launch/rayjob.py)."""

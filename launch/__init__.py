"""Backends that start a Plan (embedded/remote Ray, Kubernetes RayJob). Nothing here trains."""

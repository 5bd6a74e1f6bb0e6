"""The public API is curated: a sorted __all__ that names exactly what is public."""

from __future__ import annotations

import types

import fedtensor as ft


def _isort_style(name: str) -> tuple[int, str]:
    """ruff's RUF022 order: CONSTANTS (DPSGD), then Classes, then functions."""
    return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)


def test_all_is_sorted_and_complete() -> None:
    assert ft.__all__ == sorted(ft.__all__, key=_isort_style)
    public = {
        name
        for name, value in vars(ft).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == set(ft.__all__)


def test_modules_are_the_documented_ones() -> None:
    # The public modules, and the layers of the Design section (their own names are
    # internal: the API is what ``fedtensor`` exports).
    public_modules = {
        name
        for name, value in vars(ft).items()
        if isinstance(value, types.ModuleType) and name.isidentifier() and not name.startswith("_")
    }
    documented = {"abc", "errors", "local", "ray", "sync", "testing", "transports", "virtual"}
    layers = {"client", "federated", "net", "protocol", "worker"}
    assert public_modules <= documented | layers | {"cli", "demo"}

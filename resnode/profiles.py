"""Run profiles of the chapters: ``smoke`` (seconds, for tests), ``book`` (the built book), ``paper`` (the source's scale)."""

from __future__ import annotations

from types import SimpleNamespace

from . import _checks

PROFILES = ("smoke", "book", "paper")


def settings(profile: str, smoke: dict, book: dict, paper: dict) -> SimpleNamespace:
    """The settings of ``profile``; each profile must name the same settings."""
    _checks.one_of("profile", profile, PROFILES)
    keys = set(smoke)
    if set(book) != keys or set(paper) != keys:
        raise ValueError(f"profiles name different settings: {sorted(set(smoke) ^ set(book) | set(smoke) ^ set(paper))}")
    return SimpleNamespace(profile=profile, **{"smoke": smoke, "book": book, "paper": paper}[profile])

"""Did-you-mean hints for unknown names."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence


def did_you_mean(word: str, choices: Iterable[str], n: int = 1) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest choice, or ``""`` when none is close."""
    return _hint(_closest(word, list(choices), n, 0.6))


def did_you_mean_path(key: str, paths: Iterable[str], n: int = 2, exact: bool = False) -> str:
    """A hint for an unknown dotted ``key`` from every known dotted key path, e.g.
    ``train.lr`` -> ``train.optimizer.lr``: paths whose last part is the key's last part
    (or, unless ``exact``, very close to it), those sharing most of the key's sections first."""
    parts = key.split(".")
    leaf = parts[-1].lower()
    paths = [p for p in paths if p != key]
    found = [p for p in paths if p.split(".")[-1].lower() == leaf]
    if not found and not exact:
        leaves = {p.split(".")[-1].lower() for p in paths}
        close = set(difflib.get_close_matches(leaf, leaves, n=3, cutoff=0.8))
        found = [p for p in paths if p.split(".")[-1].lower() in close]
    if not found:
        return ""

    def rank(path: str) -> tuple[int, int, int]:
        other = path.split(".")
        shared = sum(1 for part in parts[:-1] if part in other[:-1])
        same_leaf = other[-1].lower() == leaf
        return (-shared, not same_leaf, len(other))

    found.sort(key=rank)
    best = rank(found[0])[:2]
    return _hint([p for p in found if rank(p)[:2] == best][:n])


def _closest(word: str, choices: Sequence[str], n: int, cutoff: float) -> list[str]:
    close = difflib.get_close_matches(word, choices, n=n, cutoff=cutoff)
    if not close:
        lower = {c.lower(): c for c in choices}
        close = [
            lower[c] for c in difflib.get_close_matches(word.lower(), lower, n=n, cutoff=cutoff)
        ]
    return close


def _hint(close: Sequence[str]) -> str:
    if not close:
        return ""
    return " (did you mean " + " or ".join(f"'{c}'" for c in close) + "?)"

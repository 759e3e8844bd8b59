"""Split one dataset's examples across federated clients (IID, label-Dirichlet or by column)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

from fedsb.data.dataset import TextDataset
from fedsb.errors import DataError

SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "column")
MAX_DIRICHLET_RETRIES = 100


def partition(
    dataset: TextDataset,
    num_clients: int,
    *,
    scheme: str = "dirichlet",
    alpha: float = 0.5,
    seed: int = 0,
    column_groups: bool = False,
    min_size: int = 1,
) -> list[list[int]]:
    """Assign every example index of `dataset` to exactly one of `num_clients` clients.

    Returns one ascending index list per client; the same arguments give the same result.

    * ``iid``: shuffle, then deal out evenly.
    * ``dirichlet``: per class, proportions ~ Dir(alpha) over clients (smaller alpha = more
      skew), redrawn until every client has >= `min_size` examples. With `column_groups=True`
      the skew is drawn over `dataset.groups` instead of the labels.
    * ``column``: whole groups of `dataset.groups` to clients, largest group first to the
      currently smallest client, so no group is shared between clients.
    """
    _check_common(dataset, num_clients, scheme, alpha)
    if scheme == "iid":
        if column_groups:
            raise DataError(
                "column_groups=True only applies to scheme='dirichlet' (scheme='column' always "
                "uses groups); got scheme='iid'."
            )
        return _iid(len(dataset), num_clients, seed)
    if scheme == "dirichlet":
        keys = _groups_or_fail(dataset, scheme) if column_groups else dataset.labels
        return _dirichlet(keys, num_clients, alpha, seed, min_size)
    return _by_column(_groups_or_fail(dataset, scheme), num_clients)


def _check_common(dataset: TextDataset, num_clients: int, scheme: str, alpha: float) -> None:
    """Reject arguments that no scheme can honour."""
    if scheme not in SCHEMES:
        raise DataError(
            f"unknown partition scheme {scheme!r}; expected one of {', '.join(SCHEMES)}."
        )
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise DataError(f"num_clients must be an integer >= 1; got {num_clients!r}.")
    if not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha > 0):
        raise DataError(
            f"alpha must be a finite number > 0; got {alpha!r}. "
            "Small values (0.1) give strong label skew, large values (100) near-IID clients."
        )
    if len(dataset) < num_clients:
        raise DataError(
            f"dataset {dataset.name!r} has {len(dataset)} examples but num_clients={num_clients}; "
            "every client needs at least one example. Use fewer clients or more data."
        )


def _groups_or_fail(dataset: TextDataset, scheme: str) -> list[str]:
    """The dataset's group column, or a DataError saying which loaders provide one."""
    if dataset.groups is None:
        raise DataError(
            f"scheme={scheme!r} with groups needs dataset.groups, but {dataset.name!r} has "
            "groups=None. Use a dataset with groups (drugreview, chatterbot-language, or "
            "name='file' with group_column=...) or scheme='iid'/'dirichlet'."
        )
    return dataset.groups


def _iid(n: int, num_clients: int, seed: int) -> list[list[int]]:
    """A seeded shuffle dealt into near-equal shares (sizes differ by at most one)."""
    order = np.random.default_rng(seed).permutation(n)
    return [sorted(int(i) for i in share) for share in np.array_split(order, num_clients)]


def _dirichlet(
    keys: Sequence[int | str], num_clients: int, alpha: float, seed: int, min_size: int
) -> list[list[int]]:
    """Label-Dirichlet non-IID split (Hsu et al. 2019), redrawn until clients reach min_size."""
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
        raise DataError(f"min_size must be an integer >= 0; got {min_size!r}.")
    if min_size * num_clients > len(keys):
        raise DataError(
            f"min_size={min_size} for {num_clients} clients needs {min_size * num_clients} "
            f"examples; the dataset has {len(keys)}. Lower min_size or num_clients."
        )
    members = _members(keys)
    rng = np.random.default_rng(seed)
    for _ in range(MAX_DIRICHLET_RETRIES):
        clients = _dirichlet_draw(members, num_clients, alpha, rng)
        if min(len(c) for c in clients) >= min_size:
            return [sorted(c) for c in clients]
    raise DataError(
        f"dirichlet partition with alpha={alpha} over {len(members)} classes could not give each "
        f"of {num_clients} clients >= {min_size} examples in {MAX_DIRICHLET_RETRIES} draws. "
        "Raise alpha, use fewer clients, lower min_size, or try another seed."
    )


def _members(keys: Sequence[int | str]) -> list[np.ndarray]:
    """Indices of each distinct key, keys in sorted order (so the draw is order-independent)."""
    by_key: dict[int | str, list[int]] = {}
    for i, key in enumerate(keys):
        by_key.setdefault(key, []).append(i)
    return [np.asarray(by_key[k], dtype=np.int64) for k in sorted(by_key)]


def _dirichlet_draw(
    members: list[np.ndarray], num_clients: int, alpha: float, rng: np.random.Generator
) -> list[list[int]]:
    """One draw: each class's shuffled indices cut by Dirichlet proportions."""
    clients: list[list[int]] = [[] for _ in range(num_clients)]
    for indices in members:
        shuffled = rng.permutation(indices)
        proportions = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(proportions)[:-1] * len(shuffled)).astype(np.int64)
        for client, share in zip(clients, np.split(shuffled, cuts), strict=True):
            client.extend(int(i) for i in share)
    return clients


def _by_column(groups: list[str], num_clients: int) -> list[list[int]]:
    """Greedy: groups by size (desc, then name) each go to the currently smallest client."""
    sizes = Counter(groups)
    if len(sizes) < num_clients:
        raise DataError(
            f"scheme='column' has {len(sizes)} distinct groups for {num_clients} clients; "
            "expected at least one group per client. Use fewer clients or another scheme."
        )
    owner: dict[str, int] = {}
    loads = [0] * num_clients
    for group, size in sorted(sizes.items(), key=lambda item: (-item[1], item[0])):
        client = min(range(num_clients), key=lambda c: (loads[c], c))
        owner[group] = client
        loads[client] += size
    clients: list[list[int]] = [[] for _ in range(num_clients)]
    for i, group in enumerate(groups):
        clients[owner[group]].append(i)
    return clients

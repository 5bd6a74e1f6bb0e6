"""Tags, descriptions and search: how a client finds objects on a worker by name.

Theory of operation
-------------------
PySyft 0.2 let a tensor carry ``tags`` (``"#mnist"``) and a ``description``, and a
worker answer ``search("#mnist", "#data")`` with pointers to what matches. Here the
metadata lives beside the client's objects, in its session (``Session.metadata``: id
-> tags, description), set by the worker operation ``fedtensor.describe`` (which
``ft.send(..., tags=..., description=...)``, ``ptr.tag(...)`` and
``ptr.describe(...)`` queue). ``fedtensor.search`` answers with a description of each
match, never the value; the client then makes pointers to them, pipelined:
``fedtensor.alias`` for its own objects (the same object under a new id, so the
search's pointer and the original one each own an id), ``fedtensor.dataset`` for a data
set's part (a copy, as for :func:`fedtensor.load_dataset`).

What a search sees: the asking client's own tagged objects (its session, never
another client's), and the data sets the worker holds (``--dataset NAME=FILE``,
``datasets=``), two entries each: its ``data`` (tags ``NAME``, ``#NAME``, ``#data``)
and its ``targets`` (``NAME``, ``#NAME``, ``#target``, ``#targets``), plus the tags the
worker was given for it (``--dataset-tags NAME=TAG,...``, ``dataset_tags=``).

Matching is PySyft's: every term must match (AND); a term matches a tag equal to it, or
a substring of the description. Metadata of released objects is dropped lazily; objects
whose command failed are not found. An alias counts against the client's memory quota
as a second copy would (the quota counts what each id holds); an object's tags and
description count too, from its describe until they are dropped (see
:meth:`fedtensor.worker.exchange.Exchange._describe`), and a search is sized before it
runs by an entry per described object (:func:`fedtensor.worker.budget.search_bytes`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedtensor.worker.failed import Failed

__all__ = [
    "MAX_TAGS",
    "MAX_TEXT",
    "Metadata",
    "dataset_entries",
    "describe",
    "search",
]

#: Tags one object may carry, and characters in a tag, a description or a search term.
MAX_TAGS = 256
MAX_TEXT = 4096

Metadata = tuple[frozenset[str], str | None]


def _texts(value: object, what: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(item, str) for item in items):
        raise TypeError(f"{what} must be strings")
    if len(items) > MAX_TAGS or any(len(item) > MAX_TEXT for item in items):
        raise ValueError(f"at most {MAX_TAGS} {what} of at most {MAX_TEXT} characters each")
    return list(items)


def describe(
    metadata: dict[int, Metadata],
    objects: Mapping[int, Any],
    object_id: object,
    tags: object,
    description: object,
) -> None:
    """Add ``tags`` to object ``object_id`` and, unless ``None``, set its description."""
    if type(object_id) is not int or object_id not in objects:
        raise LookupError(f"no object with id {object_id!r} to describe")
    new_tags = _texts(tags, "tags")
    if description is not None and (
        not isinstance(description, str) or len(description) > MAX_TEXT
    ):
        raise TypeError(f"a description is a string of at most {MAX_TEXT} characters")
    old_tags, old_description = metadata.get(object_id, (frozenset(), None))
    merged = old_tags | frozenset(new_tags)
    if len(merged) > MAX_TAGS:
        raise ValueError(f"an object carries at most {MAX_TAGS} tags")
    metadata[object_id] = (merged, old_description if description is None else description)
    if len(metadata) > 2 * len(objects) + 64:
        for stale in [id_ for id_ in metadata if id_ not in objects]:
            del metadata[stale]


def _matches(terms: Sequence[str], tags: frozenset[str], description: str | None) -> bool:
    return all(term in tags or (description is not None and term in description) for term in terms)


def dataset_entries(
    datasets: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    dataset_tags: Mapping[str, Sequence[str]],
) -> list[tuple[str, str, frozenset[str], torch.Tensor]]:
    """``(name, part, tags, tensor)`` for both parts of every data set a worker holds."""
    entries = []
    for name, (data, targets) in sorted(datasets.items()):
        common = {name, f"#{name}", *dataset_tags.get(name, ())}
        entries.append((name, "data", frozenset({*common, "#data"}), data))
        entries.append((name, "targets", frozenset({*common, "#target", "#targets"}), targets))
    return entries


def search(
    metadata: dict[int, Metadata],
    objects: Mapping[int, Any],
    datasets: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    dataset_tags: Mapping[str, Sequence[str]],
    query: object,
) -> list[dict[str, Any]]:
    """What matches every term of ``query``: the client's objects, then the data sets."""
    terms = _texts(query, "search terms")
    found: list[dict[str, Any]] = []
    for id_, (tags, description) in list(metadata.items()):
        value = objects.get(id_)
        if value is None and id_ not in objects:
            del metadata[id_]  # released since it was described
            continue
        if type(value) is Failed or not _matches(terms, tags, description):
            continue
        entry: dict[str, Any] = {
            "kind": "object",
            "id": id_,
            "tags": sorted(tags),
            "description": description,
            "shape": None,
            "dtype": None,
        }
        if isinstance(value, torch.Tensor):
            entry["shape"], entry["dtype"] = list(value.shape), value.dtype
        found.append(entry)
    for name, part, tags, tensor in dataset_entries(datasets, dataset_tags):
        if _matches(terms, tags, None):
            found.append(
                {
                    "kind": "dataset",
                    "name": name,
                    "part": part,
                    "tags": sorted(tags),
                    "description": None,
                    "shape": list(tensor.shape),
                    "dtype": tensor.dtype,
                }
            )
    return found

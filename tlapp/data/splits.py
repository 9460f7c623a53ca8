"""Stable train/val/test splits by content hash, in one pass over the samples.

A file's split depends on its content hash only (so adding files moves nothing), except
in a class the hash left without a train, val or test file; identical files share one
split, across classes the first class's. The work is one pass over the samples plus one
per class over that class's own files: never classes x files.
"""
from __future__ import annotations

import array
import collections
import hashlib
from typing import Sequence

MIN_CLASS_IMAGES = 3  # fewer cannot fill train, val and test


def hash_fraction(key: str) -> float:
    """A stable number in [0, 1) from a string: a file's split never depends on other files."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:15], 16) / 16**15


def assign_splits(keys: list[str], val_fraction: float, test_fraction: float) -> dict[str, str]:
    """Stable hash split of one class's files (keyed by content hash, or any string), with
    at least one val and one test file whenever the class has 3 or more.

    A key's split depends only on itself, except in a class the hash left without a train,
    val or test file: there one key is moved from a split that can spare one (train first,
    lowest hash first). Adding keys to a class that needed no filling moves nothing.
    """
    paths = list(dict.fromkeys(keys))
    u = {p: hash_fraction(p) for p in paths}
    split = {p: "test" if u[p] < test_fraction else
             "val" if u[p] < test_fraction + val_fraction else "train" for p in paths}
    if len(paths) >= 3:
        by_u = sorted(paths, key=u.get)
        for target in _wanted(val_fraction, test_fraction):
            counts = collections.Counter(split.values())
            if counts[target] == 0:  # take a file from a split that can spare one, train first
                donors = [p for p in by_u if counts[split[p]] > 1]
                donor = next((p for p in donors if split[p] == "train"), donors[0])
                split[donor] = target
    return split


def _wanted(val_fraction: float, test_fraction: float) -> list[str]:
    return ["train"] + [name for name, f in (("test", test_fraction), ("val", val_fraction))
                        if f > 0]


def class_splits(keys: Sequence[str], val_fraction: float, test_fraction: float) -> list[str]:
    """`assign_splits` for one class, as a list aligned with `keys`: without the dicts of
    assign_splits unless the class needs filling (a wanted split the hash left empty)."""
    natural = ["test" if u < test_fraction else "val" if u < test_fraction + val_fraction
               else "train" for u in map(hash_fraction, keys)]
    present = set(natural)
    if all(name in present for name in _wanted(val_fraction, test_fraction)):
        return natural  # filling moves nothing: every wanted split has a file
    split = assign_splits(list(keys), val_fraction, test_fraction)
    return [split[key] for key in keys]


def split_samples(digests: Sequence[str], labels: Sequence[int], given: Sequence[str | None],
                  classes: int, carve: dict[str, float],
                  groups: Sequence[str] | None = None) -> tuple[list[str], dict]:
    """The split of each sample, and what the scan reports about duplicates.

    Args:
        digests, labels, given: per sample, its content hash, class and given split folder
            (None without one; "train", "val", "test" in a presplit layout).
        carve: the val and test fractions to carve out of train (0 for a given split).
        groups: per sample, its group: then every sample of a group gets the split a hash
            of the group's name chooses (`group_splits`), whatever its class.

    Returns:
        (splits aligned with the samples, {"duplicates", "conflicts", "leaks", "per_class"},
        and with groups "groups" (groups per split) and "thin" (classes whose groups miss
        a split)).
    """
    if groups is not None:
        return group_splits(digests, labels, given, classes, carve, groups)
    seen, repeated = set(), set()
    for digest in digests:
        (repeated if digest in seen else seen).add(digest)
    duplicates = len(digests) - len(seen)
    del seen
    members = [array.array("q") for _ in range(classes)]  # the samples split by hash
    for i, (label, where) in enumerate(zip(labels, given)):
        if where in (None, "train"):
            members[label].append(i)
    splits = list(given)
    chosen: dict[str, str] = {}  # a repeated content's split: its first class's
    for indices in members:
        names = class_splits([digests[i] for i in indices], carve["val"], carve["test"])
        for i, name in zip(indices, names):
            splits[i] = chosen.setdefault(digests[i], name) if digests[i] in repeated else name
    labels_of, given_of = collections.defaultdict(set), collections.defaultdict(set)
    for digest, label, where in zip(digests, labels, given):
        if digest in repeated:
            labels_of[digest].add(label)
            given_of[digest].add(where)
    return splits, {
        "duplicates": duplicates,
        "conflicts": sum(len(v) > 1 for v in labels_of.values()),
        "leaks": sum(len(v - {None}) > 1 for v in given_of.values()),
        "per_class": collections.Counter(labels)}


def group_splits(digests: Sequence[str], labels: Sequence[int], given: Sequence[str | None],
                 classes: int, carve: dict[str, float], groups: Sequence[str]
                 ) -> tuple[list[str], dict]:
    """`split_samples` with groups: a group's split depends on its name only (stable as
    images are added), so no group straddles two splits. No split is filled for a class
    whose groups all fell elsewhere (that would split a group): it is reported instead."""
    names: dict[str, str] = {}
    splits = []
    for group, where in zip(groups, given):
        if where not in (None, "train"):
            splits.append(where)
            continue
        if (name := names.get(group)) is None:
            u = hash_fraction("group\0" + group)
            name = names[group] = "test" if u < carve["test"] else \
                "val" if u < carve["test"] + carve["val"] else "train"
        splits.append(name)
    del names
    per_split = {name: set() for name in ("train", "val", "test")}
    reached = [set() for _ in range(classes)]
    first: dict[str, tuple[int, str]] = {}
    duplicates = conflicts = leaks = 0
    for digest, label, group, split in zip(digests, labels, groups, splits):
        per_split[split].add(group)
        reached[label].add(split)
        if digest in first:
            duplicates += 1
            conflicts += first[digest][0] != label
            leaks += first[digest][1] != split
        else:
            first[digest] = (label, split)
    wanted = _wanted(carve["val"], carve["test"])
    return splits, {
        "duplicates": duplicates, "conflicts": conflicts, "leaks": leaks,
        "per_class": collections.Counter(labels),
        "groups": {name: len(members) for name, members in per_split.items()},
        "thin": {label: sorted(set(wanted) - splits_of, key=wanted.index)
                 for label, splits_of in enumerate(reached) if set(wanted) - splits_of}}


def split_warnings(report: dict, classes: list[str]) -> list[str]:
    """The scan's warnings about label conflicts, overlapping given splits, small classes."""
    warnings = []
    if report["conflicts"]:
        warnings.append(f"{report['conflicts']} image(s) appear with identical content in more "
                        f"than one class folder: their labels conflict")
    if report["leaks"] and "groups" in report:
        warnings.append(f"{report['leaks']} image(s) have identical content in groups that "
                        f"landed in different splits: the same picture is in two splits")
    elif report["leaks"]:
        warnings.append(f"{report['leaks']} image(s) appear in more than one of the given "
                        f"train/, val/ and test/ folders: the splits overlap (kept as given)")
    for label, missing in report.get("thin", {}).items():
        warnings.append(f"class '{classes[label]}' has too few groups to reach "
                        f"{' and '.join(missing)}: every group of it fell in another split "
                        f"(groups are never divided); add groups or raise the fractions")
    for label, name in enumerate(classes):
        count = report["per_class"][label]
        if count < MIN_CLASS_IMAGES:
            warnings.append(f"class '{name}' has only {count} usable image(s): it cannot "
                            f"appear in train, val and test; add at least "
                            f"{MIN_CLASS_IMAGES - count} more")
    return warnings


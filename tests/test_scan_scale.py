"""The streaming scan: the same results as the per-class algorithm it replaced, bounded
memory per file, its store of check results, class names that would break label files."""
import collections
import os
import random
import sqlite3
import struct
import tracemalloc

import pytest

from tests.conftest import make_folder
from tlapp import cli, config as config_lib, experiments
from tlapp.data import check_store, scan, splits
from tlapp.errors import UserInputError
from tlapp.pipeline import plan


def reference_split(usable, classes, split_roots, val_fraction, test_fraction):
    """The scan's split before this change (one loop over every sample per class)."""
    fractions = {name: 0.0 if name in split_roots else f
                 for name, f in (("val", val_fraction), ("test", test_fraction))}
    chosen, split_of = {}, {}
    for label in range(classes):
        mine = [(c, d) for c, d in usable if c[1] == label and c[2] in (None, "train")]
        assigned = splits.assign_splits([d for _, d in mine], fractions["val"],
                                        fractions["test"])
        for c, digest in mine:
            split_of[c[0]] = chosen.setdefault(digest, assigned[digest])
    result = [split_of.get(c[0], c[2]) for c, _ in usable]
    labels, given = collections.defaultdict(set), collections.defaultdict(set)
    for c, digest in usable:
        labels[digest].add(c[1])
        given[digest].add(c[2])
    return result, {"duplicates": len(usable) - len({d for _, d in usable}),
                    "conflicts": sum(len(v) > 1 for v in labels.values()),
                    "leaks": sum(len(v - {None}) > 1 for v in given.values())}


@pytest.mark.parametrize("presplit", [False, True])
def test_one_pass_split_equals_the_per_class_reference(presplit):
    rng = random.Random(1)
    for trial in range(60):
        classes = rng.randint(2, 6)
        contents = [f"{rng.getrandbits(64):064x}" for _ in range(rng.randint(3, 60))]
        usable = []
        for i in range(rng.randint(5, 120)):
            given = rng.choice(["train", "train", "val", "test"]) if presplit else None
            usable.append(((f"f{i}.jpg", rng.randrange(classes), given),
                           rng.choice(contents)))  # duplicates, across classes too
        split_roots = {"train": 1, "val": 1} if presplit else {"": 1}
        fractions = (rng.choice([0.0, 0.1, 0.3]), rng.choice([0.0, 0.1, 0.2]))
        expected, report = reference_split(usable, classes, split_roots, *fractions)
        carve = {name: 0.0 if name in split_roots else f
                 for name, f in zip(("val", "test"), fractions)}
        got, got_report = splits.split_samples([d for _, d in usable],
                                               [c[1] for c, _ in usable],
                                               [c[2] for c, _ in usable], classes, carve)
        assert got == expected, trial
        assert {k: got_report[k] for k in report} == report, trial


@pytest.mark.parametrize("name", ["ca\nt", "tab\there", "line\u2028sep", "bell\x07"])
def test_class_folder_with_a_control_character_is_refused(tmp_path, name, capsys):
    data = make_folder(tmp_path / "data", per_class=3, classes={"dog": 0.3, name: 0.0})
    with pytest.raises(UserInputError, match="contains a control or line-break character") as e:
        scan.scan_folder(data)
    assert repr(name) in str(e.value)
    assert cli.main(["train", str(data), "--backbone", "resnet50", "--weights", "none",
                     "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run")]) == 2
    assert repr(name) in capsys.readouterr().err


def test_unicode_class_names_round_trip(tmp_path):
    names = {"chat noir": 0.0, "Hund\u00a0groß": 0.33, "狐狸": 0.6}  # spaces, NBSP, CJK
    scanned = scan.scan_folder(make_folder(tmp_path / "data", per_class=3, classes=names))
    assert scanned.classes == sorted(names)


class FullDisk:
    """A connection on a full disk: a write inside a transaction fails (SQLITE_FULL)."""

    def __init__(self, db):
        self.db = db

    def __getattr__(self, name):
        return getattr(self.db, name)

    def executemany(self, *args):
        raise sqlite3.OperationalError("database or disk is full")


def test_full_disk_while_storing_check_results(tmp_path, monkeypatch, capsys):
    data = make_folder(tmp_path / "data", per_class=3)
    connect = check_store.CheckStore._connect
    monkeypatch.setattr(check_store.CheckStore, "_connect", lambda self: FullDisk(connect(self)))
    with pytest.raises(UserInputError, match=r"disk holding the scan's check results is full"):
        scan.scan_folder(data, cache_dir=tmp_path / "cache")
    assert cli.main(["train", str(data), "--backbone", "resnet50", "--weights", "none",
                     "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "is full" in err and str(tmp_path / "cache" / "scan") in err
    assert "MiB more are needed" in err and "Traceback" not in err
    (path,) = (tmp_path / "cache" / "scan").glob("*/checks-*.sqlite")
    with sqlite3.connect(path) as db:  # rolled back: nothing half stored
        assert db.execute("SELECT count(*) FROM files").fetchone() == (0,)


def test_damaged_check_store_is_set_aside(tmp_path, caplog):
    data = make_folder(tmp_path / "data", per_class=3)
    first = scan.scan_folder(data, cache_dir=tmp_path / "cache")
    (path,) = (tmp_path / "cache" / "scan").glob("*/checks-*.sqlite")
    path.write_bytes(b"this is not a database" * 100)
    for suffix in ("-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    again = scan.scan_folder(data, cache_dir=tmp_path / "cache")
    assert again.samples == first.samples and again.checked == len(first.samples)
    assert "was damaged" in caplog.text
    assert scan.scan_folder(data, cache_dir=tmp_path / "cache").checked == 0


def test_runs_of_an_experiment_share_one_scan(tmp_path, monkeypatch):
    data = make_folder(tmp_path / "data", per_class=3)
    calls = []
    real_scan = plan.scan_folder
    monkeypatch.setattr(plan, "scan_folder", lambda *a, **k: calls.append(a) or real_scan(*a, **k))
    scans = {}
    config = config_lib.from_dict({"data": str(data)}, "test")
    first = plan.scan_data(config, tmp_path, scans)
    assert plan.scan_data(config.replace(lr=0.5), tmp_path, scans) is first
    other = plan.scan_data(config.replace(val_fraction=0.3), tmp_path, scans)
    assert other is not first and len(calls) == 2
    seen = []
    monkeypatch.setattr(experiments.pipeline, "run",
                        lambda config, scans=None, backbones=None: seen.append(scans) or 1 / 0)
    path = tmp_path / "exp.toml"
    path.write_text(f'data = "{data}"\nweights = "none"\n[sweep]\nlr = [0.01, 0.1, 0.2]\n')
    experiments.run_experiment(path, out=tmp_path / "out")
    assert len(seen) == 3 and seen[0] is seen[1] is seen[2] and isinstance(seen[0], dict)


def write_tiny_bmps(root, count: int, classes: int = 4, distinct: int = 1000) -> None:
    """`count` 2x2 BMPs (70 bytes each) in `classes` folders, `distinct` different contents
    (the others are copies, far apart, so each content is decoded once)."""
    header = (b"BM" + struct.pack("<IHHI", 70, 0, 0, 54)
              + struct.pack("<IiiHHIIiiII", 40, 2, 2, 1, 24, 0, 16, 2835, 2835, 0, 0))
    for label in range(classes):
        os.makedirs(root / f"c{label}", exist_ok=True)
    for i in range(count):
        pixels = (i % distinct).to_bytes(6, "little") + b"\0\0" + b"\x80" * 6 + b"\0\0"
        with open(root / f"c{i % classes}" / f"{i:06d}.bmp", "wb") as f:
            f.write(header + pixels)


@pytest.mark.slow
def test_scan_memory_per_file_is_bounded(tmp_path):
    """The scan of 20,000 files (cold, with its store) allocates at most 450 bytes of Python
    memory per file at its peak, the finished scan included (it was ~3 KB per file before
    issue 14, ~610 B after its first round; ~380 B with the usable files as arrays)."""
    write_tiny_bmps(tmp_path / "data", 20_000)
    tracemalloc.start()
    scanned = scan.scan_folder(tmp_path / "data", cache_dir=tmp_path / "cache")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(scanned.samples) == 20_000 and not scanned.skipped
    assert peak / 20_000 < 450, f"{peak / 20_000:.0f} bytes per file"


@pytest.mark.slow
def test_rescan_looks_files_up_a_window_at_a_time(tmp_path, monkeypatch):
    """Issue 14: an unchanged folder is rescanned with one SQLite query per window of
    files (it was one per file), with the same result, and nothing is written."""
    from tlapp.data import checking

    write_tiny_bmps(tmp_path / "data", 300, distinct=300)
    for path in (tmp_path / "data").rglob("*.bmp"):  # written clearly before the scan
        os.utime(path, (1_600_000_000, 1_600_000_000))
    first = scan.scan_folder(tmp_path / "data", cache_dir=tmp_path / "cache")
    statements = []
    connect = check_store.CheckStore._connect

    def traced(self):
        db = connect(self)
        db.set_trace_callback(statements.append)
        return db

    monkeypatch.setattr(check_store.CheckStore, "_connect", traced)
    again = scan.scan_folder(tmp_path / "data", cache_dir=tmp_path / "cache")
    assert again.split_json() == first.split_json()
    lookups = [s for s in statements if s.lstrip().upper().startswith("SELECT F.")]
    assert 0 < len(lookups) <= -(-300 // checking.WINDOW)
    assert not [s for s in statements if s.lstrip().upper().startswith(("INSERT", "BEGIN"))]

"""`tlapp extract`: the cache filled in shards by concurrent processes equals one extraction."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import make_folder
from tlapp import cli
from tlapp.errors import UserInputError
from tlapp.pipeline.extraction import in_shard, parse_shard

FLAGS = ["--backbone", "resnet50", "--weights", "none", "--image-size", "32"]


def test_shards_partition_by_content_hash():
    digests = [f"{i:064x}" for i in range(0, 10**6, 7919)]
    for n in (1, 2, 5):
        owners = [[i for i in range(n) if in_shard(d, (i, n))] for d in digests]
        assert all(len(o) == 1 for o in owners)
    assert parse_shard("1/4") == (1, 4) and parse_shard(" 0 / 2 ") == (0, 2)
    for bad in ("4/4", "-1/2", "1", "a/b", "1/0"):
        with pytest.raises(UserInputError, match="--shard is I/N"):
            parse_shard(bad)


def test_tf_config_gives_the_shard(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert parse_shard(None) is None
    monkeypatch.setenv("TF_CONFIG", json.dumps({
        "cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]},
        "task": {"type": "worker", "index": 2}}))
    assert parse_shard(None) == (2, 3)


def rows(cache_dir: Path, digests: list[str]) -> np.ndarray:
    from tlapp.features.cache import FeatureCache
    from tlapp.features.entries import list_entries
    from tlapp.features.loader import FeatureLoader

    (entry,) = list_entries(cache_dir)
    cache = FeatureCache(cache_dir, entry["key"])
    with FeatureLoader(cache, digests, np.zeros(len(digests), np.int32), 3) as loader:
        return loader.gather(np.arange(len(digests)))


@pytest.mark.slow
def test_two_concurrent_shards_equal_one_extraction(tmp_path, capsys):
    from tlapp.data.scan import scan_folder

    data = make_folder(tmp_path / "data", per_class=6)
    shared = tmp_path / "shared-cache"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("TF_CONFIG", None)
    workers = [subprocess.Popen(
        [sys.executable, "-m", "tlapp", "-q", "extract", str(data), *FLAGS, "--cache-dir",
         str(shared), "--shard", f"{i}/2"], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [w.communicate(timeout=600) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    counts = [int(out.split(" images")[0].split(": ")[-1]) for out, _ in outputs]
    assert sum(counts) == 18 and min(counts) > 0

    assert cli.main(["extract", str(data), *FLAGS, "--cache-dir", str(tmp_path / "one")]) == 0
    assert "extracted 18 rows" in capsys.readouterr().out
    digests = [s.sha256 for s in scan_folder(data).samples]
    np.testing.assert_array_equal(rows(shared, digests), rows(tmp_path / "one", digests))

    assert cli.main(["cache", "verify", "--cache-dir", str(shared)]) == 0
    run = tmp_path / "run"
    assert cli.main(["train", str(data), *FLAGS, "--epochs", "1", "--cache-dir", str(shared),
                     "--out", str(run)]) == 0
    assert json.loads((run / "metrics.json").read_text())["cache"]["extracted"] == 0


def test_extract_refuses_what_has_no_cache(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class=3)
    code = cli.main(["extract", str(data), "--backbone", "lenet5", "--weights", "none",
                     "--cache-dir", str(tmp_path / "c")])
    assert code == 2 and "Nothing to extract" in capsys.readouterr().err

"""The start-up sample count cannot go stale: a pass that failed a shard is not cached, the cache is keyed on each
shard's identity (size + mtime locally, ETag / Content-Length over HTTP), a refused figure names its source, and a
preemption signal ends the count at once with exit 124 (a real process against a real stalled HTTP server)."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from alignclip.config import ConfigError, load_config
from alignclip.data import build_train_loader
from alignclip.data.shards import StreamPolicy, count_samples, shard_identity
from tests.helpers.processes import child_env, default_signals, launch, wait_all, wait_for
from tests.helpers.shard_server import serve
from tests.helpers.tiny import tiny_overrides, write_toy_shards

POLICY = StreamPolicy(timeout_s=5, retries=0, backoff_s=0.1)


@pytest.fixture
def server(tmp_path):
    """(base URL, shard folder, server): 4 shards of 8 samples WITHOUT metadata, so every count reads them."""
    root = tmp_path / "www"
    write_toy_shards(root / "shards", num_shards=4, per_shard=8, seed=0)
    for stats in (root / "shards").glob("*_stats.json"):
        stats.unlink()
    with serve(root) as (base, httpd):
        yield base, root / "shards", httpd


def _urls(base: str, n: int = 4) -> list[str]:
    return [f"{base}/shards/{i:05d}.tar" for i in range(n)]


def test_a_count_from_an_outage_or_a_404_is_not_cached_and_the_next_start_counts_again(server, tmp_path):
    base, _, httpd = server
    cache = tmp_path / "counts"
    httpd.down.set()  # every shard unreachable on the first start
    n, source = count_samples(_urls(base), POLICY, cache)
    assert n == 0 and "not cached" in source
    assert not list(cache.glob("count-*.json"))  # was: 0 cached, and every later start exited 2 on it
    httpd.down.clear()
    httpd.missing = {"00002.tar"}  # one 404 during the count
    n, source = count_samples(_urls(base), POLICY, cache)
    assert n == 24 and "not cached" in source and "unreadable_shard" in source
    httpd.missing = set()
    n, source = count_samples(_urls(base), POLICY, cache)
    assert n == 32 and "cached in" in source  # the first complete pass, and only it, is cached
    n, source = count_samples(_urls(base), POLICY, cache)
    assert n == 32 and source.startswith("the cached count ") and str(cache) in source


def test_local_shards_rewritten_in_place_are_counted_again(tmp_path):
    folder = tmp_path / "shards"
    write_toy_shards(folder, num_shards=2, per_shard=8, seed=0)
    for stats in folder.glob("*_stats.json"):
        stats.unlink()
    shards = sorted(str(p) for p in folder.glob("*.tar"))
    cache = tmp_path / "counts"
    assert count_samples(shards, POLICY, cache)[0] == 16
    assert count_samples(shards, POLICY, cache)[1].startswith("the cached count")
    write_toy_shards(folder, num_shards=2, per_shard=32, seed=1)  # same names, 4x the samples
    for stats in folder.glob("*_stats.json"):
        stats.unlink()
    n, source = count_samples(shards, POLICY, cache)
    assert n == 64 and source.startswith("reading the 2 shards")  # was: 16 from the cache, 3/4 never reached


def test_http_shards_are_identified_by_their_headers_and_pipe_sources_are_never_cached(server, tmp_path):
    base, folder, _ = server
    identity = shard_identity(_urls(base)[0])
    assert identity is not None and f"content-length={(folder / '00000.tar').stat().st_size}" in identity
    assert shard_identity(f"{base}/shards/nothing.tar") is None
    assert shard_identity(f"pipe:cat {folder / '00000.tar'}") is None
    pipes = [f"pipe:cat {folder / f'{i:05d}.tar'}" for i in range(2)]
    n, source = count_samples(pipes, POLICY, tmp_path / "counts")
    assert n == 16 and "not cached" in source and "cannot be identified" in source


def test_a_refused_count_names_its_source_and_the_cache_file(tmp_path):
    folder = tmp_path / "shards"
    write_toy_shards(folder, num_shards=1, per_shard=8, seed=0)
    (folder / "00000_stats.json").unlink()
    # two spellings of one folder: a process counts a spec once, and the cache is keyed on the shards themselves
    for attempt, spec in enumerate([str(folder), str(folder) + "/"]):  # first by reading, then from the cache
        values = {"data.train": spec, "data.val": spec, "data.cache_dir": str(tmp_path / "cache"),
                  "data.workers": 0, "model.vision.image_size": 32, "model.vision.patch_size": 16,
                  "train.global_batch_size": 16}
        config = load_config(None, [f"{k}={v}" for k, v in values.items()])
        with pytest.raises(ConfigError) as err:
            build_train_loader(config, 0, 1, epoch=0)
        message = str(err.value)
        assert "8 samples per epoch" in message and "less than one global batch" in message
        expected = "reading the 1 shards" if attempt == 0 else "the cached count " + str(tmp_path / "cache")
        assert expected in message, message


_COUNT_SCRIPT = """
import sys
from alignclip.data.shards import StreamPolicy, count_samples
print("counting", flush=True)
count_samples(sys.argv[2:], StreamPolicy(timeout_s=600, retries=0), sys.argv[1])
print("count ended", flush=True)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_preemption_signal_ends_a_count_stalled_on_a_dead_server_with_exit_124(server, tmp_path, sig):
    base, _, httpd = server
    shards = [f"{base}/stall/00000.tar", *_urls(base)]
    proc = subprocess.Popen([sys.executable, "-c", _COUNT_SCRIPT, str(tmp_path / "counts"), *shards],
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=default_signals)
    try:
        wait_for(httpd.stalled.is_set, [proc], timeout=300, poll=0.05)
        proc.send_signal(sig)
        # The stalled read has a 600 s deadline: without the fix the process is still blocked when this wait ends.
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 124, out
    assert f"{sig.name} during the start-up sample count of 5 shards" in out and "exit 124" in out
    assert "count ended" not in out and not list((tmp_path / "counts").glob("count-*.json"))


@pytest.mark.heavy
def test_sigterm_to_the_trainer_during_its_start_up_count_exits_124_at_once_saving_nothing(server, tmp_path):
    base, _, httpd = server
    data = {"train": f"{base}/stall/00000.tar::{base}/shards/{{00000..00003}}.tar", "val": f"{base}/shards/00003.tar"}
    run = tmp_path / "run"
    procs = launch(tiny_overrides(data, run, **{"data.io_timeout_s": 600, "data.io_retries": 0,
                                                "data.cache_dir": str(tmp_path / "cache")}), log_dir=tmp_path)
    wait_for(httpd.stalled.is_set, procs, timeout=600, poll=0.05)
    procs[0].send_signal(signal.SIGTERM)
    assert wait_all(procs, timeout=300) == [124]
    out = (tmp_path / "rank0.out").read_text()
    assert "SIGTERM during the start-up sample count" in out, out[-3000:]
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())


@pytest.mark.heavy
def test_two_ranks_rank_0_signalled_during_the_count_both_exit_124_without_waiting_for_the_collective_timeout(
        server, tmp_path):
    """Only rank 0 counts (the others wait in the figure's broadcast): a signal to rank 0 alone reaches the others
    through that broadcast, so they leave at once with 124 instead of after ``train.collective_timeout_s``
    (here 3,000 s: longer than this test waits)."""
    base, _, httpd = server
    data = {"train": f"{base}/stall/00000.tar::{base}/shards/{{00000..00003}}.tar", "val": f"{base}/shards/00003.tar"}
    run = tmp_path / "run"
    procs = launch(tiny_overrides(data, run, **{"data.io_timeout_s": 600, "data.io_retries": 0,
                                                "train.collective_timeout_s": 3000,
                                                "data.cache_dir": str(tmp_path / "cache")}),
                   world_size=2, log_dir=tmp_path)
    wait_for(httpd.stalled.is_set, procs, timeout=600, poll=0.05)
    procs[0].send_signal(signal.SIGTERM)
    assert wait_all(procs, timeout=600) == [124, 124]
    out = (tmp_path / "rank1.out").read_text()
    assert "rank 0: SIGTERM during the start-up sample count" in out, out[-3000:]
    assert "Traceback" not in out

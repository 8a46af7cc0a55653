"""Remote shards for real: an HTTP server on 127.0.0.1 (a thread of the test) serves shards; 404, a refused
connection and a stalled transfer are counted, logged with the URL and skipped after a bounded timeout and retry
count; training over HTTP runs to the end and resumes exactly after a kill; SIGTERM during a stalled read still
saves and exits 124. ``pipe:`` sources get the same deadline. ``s3://`` shards are read from moto's S3 server
(started by the test, behind a proxy that can stall one object): the same batches, a missing object and a stall
counted and skipped, and a preemption signal ends a count stalled on S3."""

from __future__ import annotations

import http.client
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from alignclip.config import load_config
from alignclip.data import build_train_loader
from alignclip.data.shards import count_samples, iter_raw_samples, metadata_count, shard_identity, StreamPolicy
from tests.helpers.ranks import free_port
from tests.helpers.shard_server import serve
from tests.helpers.launch import final_weights
from tests.helpers.processes import assert_same_weights, child_env, latest_step, launch, wait_all, wait_for
from tests.helpers.tiny import scalar_events, tiny_overrides, write_toy_shards


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, root folder with shards/00000..00003.tar + their _stats.json, server) served on 127.0.0.1."""
    root = tmp_path_factory.mktemp("www")
    write_toy_shards(root / "shards", num_shards=4, per_shard=32, seed=0)
    with serve(root) as (base, httpd):
        yield base, root, httpd


def _config(train: str, **extra):
    values = {"data.train": train, "model.vision.image_size": 32, "model.vision.patch_size": 16,
              "train.global_batch_size": 16, "data.workers": 2, "data.shuffle_buffer": 16, "train.seed": 1,
              "data.io_timeout_s": 1, "data.io_retries": 1}
    values.update(extra)
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


def test_http_shards_give_the_same_batches_as_the_local_files_and_are_counted_from_their_stats(server, caplog):
    base, root, _ = server
    spec = f"{base}/shards/{{00000..00003}}.tar"
    assert metadata_count(iter_shards := [f"{base}/shards/{i:05d}.tar" for i in range(4)]) == 128
    assert count_samples(iter_shards)[1] == "sizes.json / *_stats.json beside the shards"
    with caplog.at_level(logging.INFO, logger="alignclip.data.pipeline"):
        remote = build_train_loader(_config(spec), 0, 1, epoch=1)
    assert "128 samples per epoch in 4 shards, from sizes.json / *_stats.json" in caplog.text
    local = build_train_loader(_config(str(root / "shards" / "{00000..00003}.tar")), 0, 1, epoch=1)
    got, expected = list(remote), list(local)
    assert len(got) == len(expected) == 8
    for a, b in zip(got, expected):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])
    assert remote.stats()["unreadable_shard"] == remote.stats()["stalled_shard"] == 0


def test_404_refused_and_stalled_shards_are_counted_logged_with_the_url_and_skipped(server, caplog):
    base, _, httpd = server
    refused = f"http://127.0.0.1:{free_port()}/shards/00000.tar"  # a port nothing listens on
    spec = "::".join([f"{base}/shards/{{00000..00003}}.tar", f"{base}/shards/missing.tar", refused,
                      f"{base}/stall/00000.tar"])
    # every good sample is needed for the epoch, so the reader must try every shard before its last batch
    loader = build_train_loader(_config(spec, **{"data.workers": 0, "data.samples_per_epoch": 128}), 0, 1, epoch=0)
    batches = list(loader)
    assert len(batches) == len(loader) == 8
    stats = loader.stats()
    assert stats["unreadable_shard"] == 2 and stats["stalled_shard"] == 1, stats
    assert stats["shard_retries"] == 3  # data.io_retries=1 for each of the three
    assert httpd.stalled.is_set()
    assert f"unreadable_shard) {base}/shards/missing.tar" in caplog.text and "HTTP error" in caplog.text
    assert f"unreadable_shard) {refused}" in caplog.text and "cannot connect" in caplog.text
    assert f"stalled_shard) {base}/stall/00000.tar" in caplog.text and "no data for 1 s" in caplog.text


def test_pipe_sources_have_the_same_deadline_and_exit_status_check(server, tmp_path, caplog):
    _, root, _ = server
    shard = root / "shards" / "00001.tar"
    assert len(list(iter_raw_samples(f"pipe:cat {shard}"))) == 32
    policy = StreamPolicy(timeout_s=0.5, retries=0)
    assert list(iter_raw_samples(f"pipe:head -c 600 {shard}; sleep 60", policy=policy)) == []
    assert "stalled_shard pipe:head" in caplog.text
    assert list(iter_raw_samples("pipe:exit 3", policy=policy)) == []
    assert "command exited with status 3" in caplog.text


@pytest.mark.heavy
def test_training_over_http_runs_to_the_end_and_a_killed_run_resumes_with_the_same_losses(server, tmp_path):
    base, _, _ = server
    data = {"train": f"{base}/shards/{{00000..00003}}.tar", "val": f"{base}/shards/00003.tar"}
    steps = 16  # two epochs of 8 steps
    extra = {"train.max_steps": steps, "checkpoint.every_steps": 4, "data.io_timeout_s": 30}
    straight = tmp_path / "straight"
    assert wait_all(launch(tiny_overrides(data, straight, **extra), log_dir=tmp_path), timeout=600) == [0]
    reference = scalar_events(straight)
    assert [s for s, _ in reference["loss/total"]] == list(range(1, steps + 1))

    resumed = tmp_path / "resumed"
    procs = launch(tiny_overrides(data, resumed, **extra), log_dir=tmp_path)
    wait_for(lambda: latest_step(resumed) >= 4, procs, timeout=600)
    procs[0].send_signal(signal.SIGKILL)
    wait_all(procs)
    killed_at = latest_step(resumed)
    assert 4 <= killed_at < steps
    assert wait_all(launch(tiny_overrides(data, resumed, **extra), log_dir=tmp_path), timeout=600) == [0]
    got = dict(scalar_events(resumed)["loss/total"])
    ref = dict(reference["loss/total"])
    assert all(abs(ref[s] - got[s]) <= 1e-6 for s in range(killed_at + 1, steps + 1)), (ref, got)
    assert_same_weights(final_weights(straight), final_weights(resumed), atol=1e-6)


@pytest.mark.heavy
def test_sigterm_while_a_read_is_stalled_still_checkpoints_and_exits_124(server, tmp_path):
    base, _, httpd = server
    httpd.stalled.clear()
    data = {"train": f"{base}/shards/{{00000..00003}}.tar::{base}/stall/00002.tar", "val": f"{base}/shards/00003.tar"}
    overrides = tiny_overrides(data, tmp_path / "run", **{"train.max_steps": 40, "data.io_timeout_s": 5,
                                                          "data.io_retries": 0, "data.samples_per_epoch": 128})
    procs = launch(overrides, log_dir=tmp_path)
    wait_for(httpd.stalled.is_set, procs, timeout=600, poll=0.05)
    procs[0].send_signal(signal.SIGTERM)  # the trainer is blocked in the stalled read right now
    assert wait_all(procs, timeout=600) == [124], (tmp_path / "rank0.out").read_text()[-3000:]
    assert latest_step(tmp_path / "run") >= 1
    log = (tmp_path / "rank0.out").read_text()
    assert f"stalled_shard) {base}/stall/00002.tar" in log
    shutil.rmtree(tmp_path / "run", ignore_errors=True)


# ------------------------------------------------------------------------------------------------------ s3://
class _S3Proxy(BaseHTTPRequestHandler):
    """Forwards every request to moto's server as it is (signed headers included); a GET of an object whose key
    holds "stall" sends the headers and 4 KiB of the body, then nothing until the test releases it."""

    protocol_version = "HTTP/1.1"

    def _forward(self):  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=60)
        upstream.request(self.command, self.path, body=body, headers=dict(self.headers))
        response = upstream.getresponse()
        data = response.read()
        upstream.close()
        self.send_response(response.status)
        headers = {k.lower(): v for k, v in response.getheaders()}
        for key, value in headers.items():
            if key not in ("transfer-encoding", "connection", "server", "date", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", headers.get("content-length", str(len(data))))
        self.end_headers()
        if self.command == "HEAD":
            return
        if self.command == "GET" and "stall" in self.path and response.status < 300:
            self.wfile.write(data[:4096])
            self.wfile.flush()
            self.server.stalled.set()
            self.server.release.wait(300)
            self.close_connection = True
            return
        self.wfile.write(data)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """(proxy, local shard folder): moto's S3 server on 127.0.0.1 with bucket "data" holding shards/00000..00003.tar
    (+ _stats.json), bare/00000..00001.tar (no metadata) and shards/stall-00000.tar; the AWS variables point s3fs
    (and the loader's workers) at the proxy in front of it."""
    pytest.importorskip("s3fs")
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    root = tmp_path_factory.mktemp("s3")
    write_toy_shards(root / "shards", num_shards=4, per_shard=32, seed=0)
    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), _S3Proxy)
    proxy.daemon_threads = True
    proxy.upstream_port = port
    proxy.stalled, proxy.release = threading.Event(), threading.Event()
    thread = threading.Thread(target=proxy.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                             "AWS_ENDPOINT_URL")}
    os.environ.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{proxy.server_address[1]}")
    try:
        client = boto3.client("s3")
        client.create_bucket(Bucket="data")
        for path in sorted((root / "shards").iterdir()):
            client.upload_file(str(path), "data", f"shards/{path.name}")
        for i in range(2):
            client.upload_file(str(root / "shards" / f"{i:05d}.tar"), "data", f"bare/{i:05d}.tar")
        client.upload_file(str(root / "shards" / "00000.tar"), "data", "shards/stall-00000.tar")
        yield proxy, root / "shards"
    finally:
        proxy.release.set()
        proxy.shutdown()
        proxy.server_close()
        thread.join(timeout=30)
        moto.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_s3_shards_give_the_same_batches_as_the_local_files_and_their_count_is_cached_by_etag(s3, tmp_path):
    _, folder = s3
    spec = "s3://data/shards/{00000..00003}.tar"
    remote = build_train_loader(_config(spec), 0, 1, epoch=1)
    local = build_train_loader(_config(str(folder / "{00000..00003}.tar")), 0, 1, epoch=1)
    got, expected = list(remote), list(local)
    assert len(got) == len(expected) == 8
    for a, b in zip(got, expected):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])
    bare = ["s3://data/bare/00000.tar", "s3://data/bare/00001.tar"]
    assert "ETag" in shard_identity(bare[0]) and shard_identity("s3://data/bare/nothing.tar") is None
    assert count_samples(bare, cache_dir=tmp_path)[0] == 64
    n, source = count_samples(bare, cache_dir=tmp_path)
    assert n == 64 and source.startswith("the cached count")


def test_a_missing_and_a_stalled_s3_object_are_counted_named_and_skipped(s3, caplog):
    proxy, _ = s3
    spec = "s3://data/shards/{00000..00003}.tar::s3://data/shards/missing.tar::s3://data/shards/stall-00000.tar"
    loader = build_train_loader(_config(spec, **{"data.workers": 0, "data.samples_per_epoch": 128}), 0, 1, epoch=0)
    assert len(list(loader)) == len(loader) == 8
    stats = loader.stats()
    assert stats["unreadable_shard"] == 1 and stats["stalled_shard"] == 1, stats
    assert proxy.stalled.is_set()
    assert "unreadable_shard) s3://data/shards/missing.tar" in caplog.text
    # was: s3fs's five 15 s retries, then an IndexError from its error handling that ended the reader
    assert "stalled_shard) s3://data/shards/stall-00000.tar" in caplog.text and "timed out" in caplog.text


def test_sigterm_ends_a_count_stalled_on_s3_at_once_with_exit_124(s3, tmp_path):
    proxy, _ = s3
    proxy.stalled.clear()
    script = ("import sys\nfrom alignclip.data.shards import StreamPolicy, count_samples\n"
              "count_samples(sys.argv[1:], StreamPolicy(timeout_s=600, retries=0))\nprint('count ended')")
    proc = subprocess.Popen([sys.executable, "-c", script, "s3://data/shards/stall-00000.tar"],
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(proxy.stalled.is_set, [proc], timeout=300, poll=0.05)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)  # the read's own timeout is 600 s
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 124 and "SIGTERM during the start-up sample count" in out, out

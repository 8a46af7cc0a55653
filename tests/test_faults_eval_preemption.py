"""Fault injection: a preemption signal while an evaluation's DataLoader workers run (``eval.workers > 0``).

Slurm and ``kill -TERM -- -PGID`` signal every process of the step, so the periodic evaluation's workers get the
signal too (before they ignored it, the trainer failed with "DataLoader worker ... killed by signal" and wrote no
checkpoint). The evaluation must survive the signal, stop early when the trainer's flag is set, and let the trainer
save at that step and exit 124; the standalone tool (alignclip-eval) must still die of a SIGTERM, workers included.

The signal is sent from a point the test controls, never after a sleep: in process, the dataset's n-th item sends
it from the worker; for the commands, one image of the evaluation folder is a FIFO, and the test signals once a
worker has opened it (that worker is then mid-evaluation, waiting for the bytes the test writes after the signal).
Timeouts are hang guards only.
"""

from __future__ import annotations

import errno
import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from tests.helpers import REPO_ROOT
from tests.helpers.launch import job_env, trainer_state
from tests.helpers.tiny import export_untrained, scalar_events, tiny_overrides
from alignclip.distributed.process import ignore_preemption_signals
from alignclip.training.preemption import REQUEUE_EXIT_CODE, PreemptionFlag

TIMEOUT_S = 300  # hang guard only
IMAGE_SIZE = 32
SIGNAL_ITEM, BATCH, ITEMS = 2, 2, 8  # the signal comes with batch 1 of 4


# ------------------------------------------------------------------------------- in process: the evaluation
class _SignalsAtItem(Dataset):
    """(image, label) pairs; reading item ``at`` in a DataLoader worker sends SIGTERM to the worker itself and,
    with ``parent``, to the evaluating process (as a process-group signal reaches both)."""

    def __init__(self, at: int, parent: bool):
        self.at, self.parent = at, parent

    def __len__(self) -> int:
        return ITEMS

    def __getitem__(self, i: int):
        if i == self.at:
            assert torch.utils.data.get_worker_info() is not None, "signals only from a worker"
            if self.parent:
                os.kill(os.getppid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # before the fix: "DataLoader worker ... killed by signal"
        return torch.full((3, IMAGE_SIZE, IMAGE_SIZE), i / ITEMS), i % 2


@pytest.fixture(scope="module")
def tiny_model():
    from alignclip.config import load_config
    from alignclip.models import build_model
    from alignclip.tokenizer import get_tokenizer

    config = load_config(None, tiny_overrides("unused"))
    torch.manual_seed(0)
    return build_model(config.model).eval(), get_tokenizer(config.model.text.context_length)


def _classification(dataset):
    from alignclip.eval.datasets import ClassificationData

    return ClassificationData(dataset, ["dark", "bright"], ["a photo of a {c}.", "a {c} picture."])


@pytest.fixture
def flag():
    flag = PreemptionFlag()  # the trainer's handler: a SIGTERM to this process only sets the flag
    yield flag
    flag.restore()


def test_eval_workers_survive_the_signal_and_an_evaluation_not_asked_to_stop_completes(tiny_model, flag):
    from alignclip.eval.benchmark import evaluate_benchmark

    model, tokenizer = tiny_model
    results = evaluate_benchmark(model, tokenizer, _classification(_SignalsAtItem(SIGNAL_ITEM, parent=True)),
                                 batch_size=BATCH, workers=1)
    assert flag.received == signal.SIGTERM and flag.pending()
    assert 0 <= results["zeroshot_classification"]["acc1"] <= 1


def test_the_evaluation_stops_at_the_next_batch_once_preemption_is_pending(tiny_model, flag):
    from alignclip.eval.benchmark import EvaluationStopped, evaluate_benchmark

    model, tokenizer = tiny_model
    with pytest.raises(EvaluationStopped) as stopped:
        evaluate_benchmark(model, tokenizer, _classification(_SignalsAtItem(SIGNAL_ITEM, parent=True)),
                           batch_size=BATCH, workers=1, should_stop=flag.pending)
    # the flag is set before the signalling batch reaches the evaluation, which encodes no batch after it
    done = re.fullmatch(r"after (\d+) of (\d+) image batches", str(stopped.value))
    assert done and int(done.group(1)) <= SIGNAL_ITEM // BATCH and int(done.group(2)) == ITEMS // BATCH, stopped.value
    print(f"\nstopped {stopped.value}")

    # pending before it starts: no worker is forked, no text encoded
    with pytest.raises(EvaluationStopped, match=r"after 0 of \d+ class prompts"):
        evaluate_benchmark(model, tokenizer, _classification(_SignalsAtItem(-1, parent=False)), batch_size=BATCH,
                           workers=1, should_stop=flag.pending)


def _signalled_before_init(worker_id: int) -> None:
    """The signal reaching a just-forked eval worker before its worker_init_fn ignores the signals."""
    os.kill(os.getpid(), signal.SIGTERM)
    ignore_preemption_signals(worker_id)


def test_a_signal_reaching_an_eval_worker_before_its_init_is_held_and_discarded(tiny_model, monkeypatch):
    import alignclip.eval.benchmark as benchmark

    model, tokenizer = tiny_model
    monkeypatch.setattr(benchmark, "ignore_preemption_signals", _signalled_before_init)
    # without the signals blocked while the workers start: "DataLoader worker ... killed by signal: Terminated"
    results = benchmark.evaluate_benchmark(model, tokenizer, _classification(_SignalsAtItem(-1, parent=False)),
                                           batch_size=BATCH, workers=2)
    assert 0 <= results["zeroshot_classification"]["acc1"] <= 1


# ------------------------------------------------------------------------------- the commands, a FIFO image
def _png(value: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (value, 255 - value, 128)).save(out, format="PNG")
    return out.getvalue()


def _eval_folder(root: Path, dangling: bool = False) -> Path:
    """An ImageFolder of ITEMS images in two classes; item SIGNAL_ITEM (ImageFolder's sorted order), in batch 1,
    is a FIFO (or, with ``dangling``, a link to a file that is gone: an error, where an undecodable image would be
    a counted skip)."""
    for c, name in enumerate(("a_bright", "b_dark")):  # sorted, as ImageFolder orders the classes
        (root / name).mkdir(parents=True)
        for i in range(ITEMS // 2):
            path = root / name / f"{i}.png"
            if c * ITEMS // 2 + i == SIGNAL_ITEM:
                path.symlink_to(root / "gone.png") if dangling else os.mkfifo(path)
            else:
                path.write_bytes(_png(40 * i + 100 * c))
    return root / "a_bright" / f"{SIGNAL_ITEM}.png"


def _open_once_a_worker_reads(fifo: Path, proc: subprocess.Popen, output: Path) -> int:
    """The FIFO's write end, opened once a worker has opened it for reading (it is inside the evaluation)."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO until a reader has it open
        except OSError as err:
            if err.errno != errno.ENXIO:
                raise
        assert proc.poll() is None, output.read_text()[-3000:]
        assert time.monotonic() < deadline, "no evaluation worker opened the FIFO"
        time.sleep(0.02)


def _signal_once_a_worker_reads(fifo: Path, proc: subprocess.Popen, send, output: Path) -> None:
    """``send()`` the signal once a worker reads the FIFO, then give the worker its image (a worker that died of
    the signal leaves a broken pipe)."""
    fd = _open_once_a_worker_reads(fifo, proc, output)
    try:
        send()
        os.set_blocking(fd, True)
        os.write(fd, _png(7))
    except BrokenPipeError:
        pass
    finally:
        os.close(fd)


def _group_gone(pgid: int, within_s: float = 60) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def _kill_group(pgid: int) -> None:
    """Cleanup after a failure: whatever is left of the command's process group."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _popen(command: list[str], output: Path) -> subprocess.Popen:
    with open(output, "wb") as out:
        return subprocess.Popen(command, env={**os.environ, **job_env()}, cwd=REPO_ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


STEPS = 3


def _train_command(run_dir: Path, cache: Path, eval_root: Path) -> list[str]:
    return [sys.executable, "-m", "alignclip.train", *tiny_overrides(cache, run_dir, **{
        "train.max_steps": STEPS, "data.workers": 1, "eval.every_steps": 1, "eval.dataset": "imagefolder",
        "eval.root": eval_root, "eval.workers": 1, "eval.batch_size": BATCH})]


@pytest.mark.heavy
def test_preemption_during_the_periodic_evaluation_saves_at_that_step_exits_124_and_resumes(tmp_path):
    """``kill -TERM -- -PGID`` while step 1's evaluation runs: trainer, training and eval workers all get it."""
    fifo = _eval_folder(tmp_path / "eval")
    run_dir, output = tmp_path / "run", tmp_path / "first.out"
    command = _train_command(run_dir, tmp_path / "data", tmp_path / "eval")
    proc = _popen(command, output)
    try:
        _signal_once_a_worker_reads(fifo, proc, lambda: os.killpg(proc.pid, signal.SIGTERM), output)
        proc.wait(timeout=TIMEOUT_S)
    finally:
        _kill_group(proc.pid)
    text = output.read_text()
    assert proc.returncode == REQUEUE_EXIT_CODE, text[-3000:]
    assert "killed by signal" not in text and "Traceback" not in text, text[-3000:]
    assert _group_gone(proc.pid), "processes of the trainer's group outlived it"
    log = (run_dir / "train.log").read_text()
    stopped = re.search(r"evaluation at step 1 stopped after (\d+) of (\d+) image batches", log)
    assert stopped and int(stopped.group(1)) <= SIGNAL_ITEM // BATCH and int(stopped.group(2)) == ITEMS // BATCH, \
        log[-2000:]
    assert re.search(r"preempted \(SIGTERM received by this rank\): saved .*step_0*1 at step 1", log), log[-2000:]
    assert trainer_state(run_dir)["step"] == 1 and not list((run_dir / "checkpoints").glob("*.tmp"))
    assert not any(tag.startswith("eval/") for tag in scalar_events(run_dir)), "a stopped evaluation logs nothing"
    print(f"\n{stopped.group(0)}; saved at step 1")

    fifo.unlink()
    fifo.write_bytes(_png(7))
    done = subprocess.run(command, env={**os.environ, **job_env()}, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resumed from" in (run_dir / "train.log").read_text() and trainer_state(run_dir)["step"] == STEPS
    assert [step for step, _ in scalar_events(run_dir)["eval/zeroshot_classification/acc1"]] == [2, 3]


@pytest.mark.heavy
def test_a_failing_evaluation_fails_the_run_at_once_with_no_process_left(tmp_path):
    """An error in the periodic evaluation (an image file that is gone) while the training loader's workers run:
    exit 1 with the error. Workers that ignore SIGTERM, kept alive by the traceback, used to hold the exit forever
    (multiprocessing's exit handler terminate()s and joins them)."""
    _eval_folder(tmp_path / "eval", dangling=True)
    output = tmp_path / "run.out"
    proc = _popen(_train_command(tmp_path / "run", tmp_path / "data", tmp_path / "eval"), output)
    try:
        proc.wait(timeout=TIMEOUT_S)
    finally:
        _kill_group(proc.pid)
    text = output.read_text()
    assert proc.returncode == 1 and "FileNotFoundError" in text, text[-3000:]
    assert _group_gone(proc.pid), "processes of the trainer's group outlived it"


@pytest.mark.heavy
@pytest.mark.parametrize("target", ["main", "group"])
def test_standalone_evaluation_still_dies_of_sigterm_with_its_workers(tmp_path, target):
    """alignclip-eval has no preemption handler: SIGTERM (to it alone, or to its process group) ends it, and its
    workers, which ignore the signal, die with it (the PDEATHSIG that ignore_preemption_signals asks for)."""
    fifo = _eval_folder(tmp_path / "eval")
    model = export_untrained(tmp_path / "m.safetensors", tiny_overrides("unused"))
    output = tmp_path / "eval.out"
    proc = _popen([sys.executable, "-m", "alignclip.commands.evaluate", "--model", str(model), "--benchmark",
                   "imagefolder", "--root", str(tmp_path / "eval"), "--workers", "1", "--batch-size", str(BATCH),
                   "--out", str(tmp_path / "results")], output)
    send = (lambda: os.kill(proc.pid, signal.SIGTERM)) if target == "main" else \
        (lambda: os.killpg(proc.pid, signal.SIGTERM))
    try:
        # the FIFO stays open for writing until the worker is gone: one that outlived the tool would wait in its read
        fd = _open_once_a_worker_reads(fifo, proc, output)
        try:
            send()
            assert proc.wait(timeout=TIMEOUT_S) == -signal.SIGTERM, output.read_text()[-3000:]
            assert _group_gone(proc.pid), "an evaluation worker outlived the tool"
        finally:
            os.close(fd)
    finally:
        _kill_group(proc.pid)
    assert not (tmp_path / "results").exists() or not list((tmp_path / "results").glob("*.json"))

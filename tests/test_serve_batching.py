"""vseg serve's batching queue and replicas, without HTTP: a lone request runs at once, requests still being
prepared are waited for, several replicas share one queue and give one replica's masks, placements parse."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from vseg.config import ConfigError
from vseg.data.synthetic import generate_vessels
from vseg.inference.inputs import DEFAULT_PROMPT
from vseg.serve import config_from_args
from vseg.serve.batcher import Batcher, Replica, Task
from vseg.serve.service import Service, placements


def task(i: int = 0) -> Task:
    return Task("segment", "teacher_forced", np.zeros((4, 4, 3), np.uint8), f"p{i}")


def take_in_thread(batcher: Batcher) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run():
        start = time.perf_counter()
        out["batch"] = batcher.take()
        out["seconds"] = time.perf_counter() - start

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def test_idle_queue_runs_a_lone_task_without_waiting_out_the_timeout():
    batcher = Batcher(max_batch_size=8, timeout_s=5.0)
    batcher.submit(task())
    start = time.perf_counter()
    assert len(batcher.take() or []) == 1
    assert time.perf_counter() - start < 1.0  # nothing was on its way: no 5 s wait


def test_tasks_being_prepared_are_waited_for_and_withdrawn_ones_are_not():
    batcher = Batcher(max_batch_size=8, timeout_s=5.0)
    batcher.announce(2)
    first, second = task(0), task(1)
    batcher.submit(first, announced=True)
    thread, out = take_in_thread(batcher)
    time.sleep(0.3)
    assert thread.is_alive()  # one more is on its way: the worker waits for it
    batcher.submit(second, announced=True)
    thread.join(5)
    assert out["batch"] == [first, second] and out["seconds"] < 4
    # an announced task whose preparation fails is withdrawn: the worker stops waiting for it
    batcher.announce(1)
    batcher.submit(third := task(2))
    thread, out = take_in_thread(batcher)
    time.sleep(0.3)
    batcher.withdraw()
    thread.join(5)
    assert out["batch"] == [third] and out["seconds"] < 4 and batcher.coming == 0


def test_placements_of_several_replicas():
    def cfg(*args):
        return config_from_args(["ckpt=random", "model=tiny", "port=9123", *args])

    assert placements(cfg("devices=auto"), cuda_count=4) == [{"device": f"cuda:{i}"} for i in range(4)]
    assert placements(cfg("devices=auto"), cuda_count=0) == [{"device": "cpu"}]
    assert placements(cfg("devices=[0,2]"), cuda_count=4) == [{"device": "cuda:0"}, {"device": "cuda:2"}]
    assert placements(cfg("devices=2"), cuda_count=4) == [{"device": "cuda:0"}, {"device": "cuda:1"}]
    (split,) = placements(cfg("device_map=balanced", "max_memory={0: 12GB, 1: 12GB}"), cuda_count=2)
    assert split["device_map"] == "balanced" and set(split["max_memory"]) == {0, 1}
    with pytest.raises(ConfigError, match="not visible"):
        placements(cfg("devices=[0,5]"), cuda_count=4)
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        placements(cfg("device_map=balanced"), cuda_count=0)


def test_two_replicas_share_the_queue_and_give_one_replicas_masks():
    """Two CPU replicas (the code path of devices=auto / [0, 2] on GPUs): each serves requests, masks equal."""
    service = Service(config_from_args(["ckpt=random", "model=tiny", "device=cpu", "port=9123", "max_batch_size=1"]))
    service.replicas = [Replica(f"replica{i}", {"device": "cpu"}, service.batcher) for i in range(2)]
    service.load()
    try:
        assert service.state == "ready", service.error
        images = [generate_vessels(seed=400 + i, size=64, style="angiogram")[0] for i in range(3)]
        expected = service.replicas[0].predictor.predict(images)
        prompt = DEFAULT_PROMPT
        # replica0 busy (its lock held): a task it takes waits, every task until then is served by replica1.
        # Which idle worker takes a task from the shared queue is up to the threads, so tasks are sent one by one
        # until replica0 has taken one (it takes about every second one; 40 tries never all go to replica1).
        with service.replicas[0].lock:
            held, by_replica1 = None, 0
            for n in range(40):
                i = n % len(images)
                future = service.prepare(lambda i=i: Task("segment", "teacher_forced", images[i], prompt))
                try:
                    outcome = future.result(timeout=5)
                except TimeoutError:
                    held = (i, future)
                    break
                assert outcome.replica == "replica1"
                by_replica1 += 1
            assert held is not None, "replica0 never took a task"
        i, future = held
        outcome = future.result(timeout=60)
        assert outcome.replica == "replica0"
        info = service.info()["replicas"]
        assert [r["images"] for r in info] == [1, by_replica1] and [r["device"] for r in info] == ["cpu", "cpu"]
        # both replicas' masks are the single-replica masks
        for j in range(3):
            out = service.prepare(lambda j=j: Task("segment", "teacher_forced", images[j], prompt)).result(60)
            assert (out.prediction.mask == expected[j].mask).all()
        assert (outcome.prediction.mask == expected[i].mask).all()
    finally:
        service.close()


@pytest.mark.parametrize("where", ["threads", "processes"])
def test_prepared_requests_give_predict_masks_and_their_own_errors(where):
    """Decoding + processor on the pool (threads, or spawned processes): masks equal `Predictor.predict`'s,
    concurrent images meet in one batch, and a bad image's 4xx comes back with its status."""
    import base64
    import io

    from PIL import Image

    from vseg.serve.prepare import ImageSource
    from vseg.serve.requests import ApiError, ImageIn

    cfg = config_from_args(["ckpt=random", "model=tiny", "device=cpu", "port=9123", f"prepare={where}", "workers=2",
                            "batch_timeout_ms=2000"])  # fmt: skip
    service = Service(cfg)
    service.load()
    try:
        assert service.state == "ready", service.error
        images = [generate_vessels(seed=410 + i, size=64 + 8 * i, style="angiogram")[0] for i in range(3)]
        expected = service.replicas[0].predictor.predict(images)

        def png(image: np.ndarray) -> bytes:
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG")
            return buffer.getvalue()

        sources = [ImageSource(f"images[{i}]", raw=png(im)) for i, im in enumerate(images[:2])]
        sources.append(ImageSource("images[2]", image=ImageIn(data=base64.b64encode(png(images[2])).decode())))
        futures = [service.prepare_segment(s, "teacher_forced", DEFAULT_PROMPT) for s in sources]
        outcomes = [f.result(timeout=120) for f in futures]
        for outcome, want in zip(outcomes, expected, strict=True):
            assert (outcome.prediction.mask == want.mask).all()
        assert max(o.batch_size for o in outcomes) > 1  # announced tasks were waited for
        bad = service.prepare_segment(ImageSource("images[0]", raw=b"not a png"), "teacher_forced", DEFAULT_PROMPT)
        with pytest.raises(ApiError) as err:
            bad.result(timeout=60)
        assert err.value.status == 415 and "images[0]" in err.value.message and service.batcher.coming == 0
    finally:
        service.close()


def test_a_busy_workers_stager_waits_for_every_task_on_its_way_and_lets_idle_takers_go_first():
    batcher = Batcher(max_batch_size=8, timeout_s=0.05)
    busy = {"worker": True}
    batcher.announce(3)
    first = task(0)
    batcher.submit(first, announced=True)
    out: dict = {}
    ahead = threading.Thread(target=lambda: out.update(batch=batcher.take(lambda: busy["worker"])))
    ahead.start()
    time.sleep(0.3)  # far past the 50 ms timeout: a busy worker's stager keeps waiting for the other two
    assert ahead.is_alive()
    second = task(1)
    batcher.submit(second, announced=True)
    time.sleep(0.1)
    assert ahead.is_alive()
    busy["worker"] = False  # the worker finished its batch: the stager takes what it has at once
    batcher.wake()
    ahead.join(5)
    assert out["batch"] == [first, second] and batcher.coming == 1
    batcher.withdraw()

    # an idle worker's taker gets queued tasks before a busy one's stager
    busy["worker"] = True
    ahead = threading.Thread(target=lambda: out.update(ahead=batcher.take(lambda: busy["worker"])))
    ahead.start()
    idle_thread, idle = take_in_thread(batcher)
    time.sleep(0.2)
    third = task(2)
    batcher.submit(third)
    idle_thread.join(5)
    assert idle["batch"] == [third] and ahead.is_alive()
    batcher.submit(fourth := task(3))
    ahead.join(5)
    assert out["ahead"] == [fourth]


def test_the_next_batch_is_collated_while_the_current_one_runs_and_gives_the_same_masks():
    service = Service(config_from_args(["ckpt=random", "model=tiny", "device=cpu", "port=9123", "max_batch_size=4"]))
    service.load()
    try:
        assert service.state == "ready", service.error
        replica = service.replicas[0]
        images = [generate_vessels(seed=420 + i, size=64, style="angiogram")[0] for i in range(4)]
        expected = replica.predictor.predict(images)
        make = [lambda i=i: Task("segment", "teacher_forced", images[i], DEFAULT_PROMPT) for i in range(4)]
        with replica.lock:  # the worker is stuck in its first batch
            first = service.prepare(make[0])
            deadline = time.time() + 30
            while not replica.busy and time.time() < deadline:
                time.sleep(0.01)
            assert replica.busy
            rest = [service.prepare(m) for m in make[1:]]
            while replica._staged is None and time.time() < deadline:
                time.sleep(0.01)
            staged = replica._staged
            # the three others, collated into one batch while the first one still holds the worker
            assert staged is not None and staged.collated is not None
            assert [t.prompt for t in staged.tasks] == [DEFAULT_PROMPT] * 3 and staged.collate_ms > 0
            assert not first.done()
        outcomes = [first.result(60)] + [f.result(60) for f in rest]
        assert [o.batch_size for o in outcomes] == [1, 3, 3, 3]
        assert "collate_ms" in outcomes[1].parts
        for outcome, want in zip(outcomes, expected, strict=True):
            assert (outcome.prediction.mask == want.mask).all()
    finally:
        service.close()


def test_a_batch_collated_for_a_switched_away_model_is_collated_again():
    service = Service(config_from_args(["ckpt=random", "model=tiny", "device=cpu", "port=9123"]))
    service.load()
    try:
        replica = service.replicas[0]
        image = generate_vessels(seed=430, size=64, style="angiogram")[0]
        old = replica.predictor
        staged = replica._collate([Task("segment", "teacher_forced", image, DEFAULT_PROMPT)])
        assert staged.predictor is old and staged.collated is not None
        fresh = service._predictor(service.source, replica.placement)
        replica.predictor = fresh
        replica._run(staged)
        outcome = staged.tasks[0].future.result(5)
        assert staged.tasks[0].encoded_by is fresh.processor  # encoded and collated again for the new model
        assert (outcome.prediction.mask == fresh.predict([image])[0].mask).all()
    finally:
        service.close()


def test_gil_switch_ms_is_checked_and_set_only_in_the_servers_own_process(monkeypatch):
    import sys

    import uvicorn

    from vseg.serve.main import main

    with pytest.raises(ConfigError, match="gil_switch_ms=0.0"):
        config_from_args(["ckpt=random", "model=tiny", "port=9123", "gil_switch_ms=0"])
    ran: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.update(kw, interval=sys.getswitchinterval()))
    monkeypatch.setattr(Service, "load_in_background", lambda self: None)
    before = sys.getswitchinterval()
    try:
        assert main(["ckpt=random", "model=tiny", "device=cpu", "port=9124", "gil_switch_ms=0.5"]) == 0
        assert ran["port"] == 9124 and ran["interval"] == pytest.approx(0.0005)
    finally:
        sys.setswitchinterval(before)


def test_a_batch_padded_to_a_warmed_size_gives_each_task_its_own_mask():
    """CUDA-graph replicas pad a batch to the next warmed size (`Replica.pad_sizes`); the padding rows' results
    are dropped. Same path on the CPU: three tasks run as a batch of four."""
    service = Service(config_from_args(["ckpt=random", "model=tiny", "device=cpu", "port=9123", "max_batch_size=4",
                                        "batch_timeout_ms=2000"]))  # fmt: skip
    service.load()
    try:
        replica = service.replicas[0]
        replica.pad_sizes = [1, 4]
        images = [generate_vessels(seed=440 + i, size=56 + 8 * i, style="angiogram")[0] for i in range(3)]
        expected = replica.predictor.predict(images)
        tasks = [Task("segment", "teacher_forced", im, DEFAULT_PROMPT) for im in images]
        staged = replica._collate(tasks)
        assert staged.collated["input_ids"].shape[0] == 4 and len(staged.collated["items"]) == 4
        replica._run(staged)
        outcomes = [t.future.result(5) for t in tasks]
        assert [o.batch_size for o in outcomes] == [3, 3, 3]
        for outcome, want in zip(outcomes, expected, strict=True):
            assert outcome.prediction.mask.shape == want.mask.shape and (outcome.prediction.mask == want.mask).all()
    finally:
        service.close()

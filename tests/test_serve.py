"""vseg serve on the tiny model over real loopback HTTP: every endpoint, batching that gives predict.py's masks,
bad requests as 4xx JSON, saved annotations that `vseg check` accepts, fine-tune jobs, a bounded load test."""

from __future__ import annotations

import base64
import io
import json
import statistics
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from vseg.cli import main as vseg_main
from vseg.config import compose
from vseg.data.synthetic import generate_vessels
from vseg.predict import run as predict
from vseg.serve import Running, config_from_args, free_port


def call(url: str, path: str, body=None, method: str | None = None, headers=None, raw: bytes | None = None):
    """(status, parsed JSON or text) of one request; HTTP errors are returned, not raised."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    req = urllib.request.Request(url + path, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            status, text = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text.decode()


def png64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def unpng(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))


def vessel(i: int) -> np.ndarray:
    return generate_vessels(seed=300 + i, size=64 + 8 * (i % 3), style="angiogram")[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    (root / "data").mkdir()
    (root / "files").mkdir()
    cfg = config_from_args(
        [
            "ckpt=random",
            "model=tiny",
            "device=cpu",
            f"port={free_port()}",
            "max_batch_size=8",
            "batch_timeout_ms=300",  # wide enough on 2 shared cores that concurrent clients meet in one batch
            "max_images=4",
            "max_pixels=250000",
            "max_upload_bytes=2000000",
            "max_prompt_chars=200",
            "max_points=8",
            f"roots=[{root / 'files'}]",
            f"data_root={root / 'data'}",
            f"jobs_root={root / 'jobs'}",
        ]
    )
    running = Running(cfg)
    assert running.service.state == "ready", running.service.error
    yield {"url": running.url, "root": root, "running": running}
    running.stop()


def test_health_model_and_docs(server):
    url = server["url"]
    assert call(url, "/health") == (200, {"status": "ready", "replicas": 1, "queued": 0})
    status, info = call(url, "/v1/model")
    assert status == 200 and info["ckpt"] == "random" and info["dtype"] == "float32"
    assert info["replicas"][0]["device"] == "cpu" and info["model"]["name"] == "tiny"
    status, spec = call(url, "/openapi.json")
    assert {"/v1/segment", "/v1/chat", "/v1/refine", "/v1/model", "/health", "/v1/jobs", "/v1/annotations"} <= set(
        spec["paths"]
    )
    assert "multipart/form-data" in spec["paths"]["/v1/segment"]["post"]["requestBody"]["content"]
    assert call(url, "/docs")[0] == 200


def test_segment_formats_agree(server):
    image = vessel(0)
    status, out = call(
        server["url"],
        "/v1/segment",
        {"images": [{"data": png64(image)}], "formats": ["png", "rle", "polygons", "probability"]},
    )
    assert status == 200, out
    r = out["results"][0]
    mask = unpng(r["mask_png"]) > 0
    assert mask.shape == image.shape[:2] and r["foreground"] == pytest.approx(mask.mean())
    assert r["answer"] == "It is [SEG]." and r["seg_tokens"] == 1
    rle = dict(r["rle"], counts=r["rle"]["counts"].encode())
    assert (mask_utils.decode(rle).astype(bool) == mask).all()
    h, w = mask.shape
    polys = mask_utils.merge(mask_utils.frPyObjects(r["polygons"], h, w))
    assert (mask_utils.decode(polys).astype(bool) == mask).all()  # polygons are exact
    prob = unpng(r["probability_png"]) / 255.0
    assert ((prob > 0.5) == mask).mean() > 0.99  # the 8-bit probability map thresholds to the mask
    assert set(r["timings"]) >= {"queue_ms", "model_ms", "batch_size"} and "total_ms" in out["timings"]
    # a request threshold re-thresholds the same probabilities
    _, low = call(server["url"], "/v1/segment", {"images": [{"data": png64(image)}], "threshold": 0.05})
    assert low["results"][0]["foreground"] >= r["foreground"]


def test_multipart_and_paths(server):
    url = server["url"]
    images = [vessel(1), vessel(2)]
    boundary = uuid.uuid4().hex
    parts = []
    for i, im in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(im).save(buffer, format="PNG")
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="im{i}.png"\r\n'
            f"Content-Type: image/png\r\n\r\n".encode()
            + buffer.getvalue()
            + b"\r\n"
        )
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="formats"\r\n\r\npng,rle\r\n'.encode())
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    status, out = call(
        url, "/v1/segment", raw=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    assert status == 200, out
    assert [r["width"] for r in out["results"]] == [im.shape[1] for im in images] and "rle" in out["results"][1]
    # the same image by path (under the roots) gives the same mask
    path = server["root"] / "files" / "im1.png"
    Image.fromarray(images[0]).save(path)
    status, by_path = call(url, "/v1/segment", {"images": [{"path": str(path)}]})
    assert status == 200 and by_path["results"][0]["mask_png"] == out["results"][0]["mask_png"]


def test_concurrent_clients_are_batched_and_equal_predict_py(server, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    images = [vessel(i) for i in range(6)]
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"im{i}.png")
    predict(
        compose("predict", ["ckpt=random", "model=tiny", f"input={folder}", f"output={tmp_path / 'out'}", "device=cpu"])
    )
    expected = {p.stem: np.asarray(Image.open(p)) > 0 for p in (tmp_path / "out" / "masks").glob("*.png")}

    def one(i):
        return call(server["url"], "/v1/segment", {"images": [{"data": png64(images[i])}]})

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(one, range(6)))
    assert all(s == 200 for s, _ in answers), answers
    sizes = [out["results"][0]["timings"]["batch_size"] for _, out in answers]
    assert max(sizes) > 1, f"concurrent requests were not batched: {sizes}"
    for i, (_, out) in enumerate(answers):
        served = unpng(out["results"][0]["mask_png"]) > 0
        assert (served == expected[f"im{i}"]).all(), f"image {i}: served mask differs from predict.py's"


def test_chat_and_refine(server):
    url = server["url"]
    image = vessel(3)
    status, chat = call(url, "/v1/chat", {"image": {"data": png64(image)}, "prompt": "Describe the image."})
    assert status == 200 and isinstance(chat["answer"], str) and chat["timings"]["batch_size"] == 1
    _, plain = call(url, "/v1/segment", {"images": [{"data": png64(image)}]})
    status, same = call(url, "/v1/refine", {"image": {"data": png64(image)}})
    assert status == 200  # no clicks: the plain mask
    # Refine runs the same kernels on the same tensors as segment, and every run here gives equal masks (a
    # stress run of 15 segment/refine pairs beside clients with other prompts and sizes: 0 pixels differ).
    # One run once differed, not reproduced since. What can flip a pixel: float32 CPU kernels change results
    # at ~1e-7 when a batch's shapes change (this image alone vs batched with a shorter prompt: 6e-8), and
    # random weights leave many probabilities at 0.5 (here 2 pixels within 1e-6, 46 within 1e-5). So the
    # masks must be equal exactly everywhere but within 1e-4 of the threshold, where at most a few may differ.
    served, refined_plain = unpng(plain["results"][0]["mask_png"]) > 0, unpng(same["mask_png"]) > 0
    probability = server["running"].service.replicas[0].predictor.predict([image], probability=True)[0].probability
    near = np.abs(probability - 0.5) < 1e-4
    assert (served == refined_plain)[~near].all() and (served != refined_plain).sum() <= 3
    clicks = {"image": {"data": png64(image)}, "points": [[5, 5], [30, 30], [50, 20]], "labels": [1, 0, 1]}
    status, refined = call(url, "/v1/refine", clicks)
    assert status == 200 and unpng(refined["mask_png"]).shape == image.shape[:2]
    # Random weights give clicks no meaning, but they must reach the decoder: the probabilities move. They move
    # by ~1e-6 on the tiny model, often too little to change an 8-bit PNG, so the float maps are compared (the
    # served replica's own Predictor, the one the endpoint called).
    predictor = server["running"].service.replicas[0].predictor
    moved = predictor.refine(image, points=clicks["points"], labels=clicks["labels"]).probability
    assert not np.array_equal(moved, predictor.refine(image).probability)


def test_save_annotation_is_checked_training_data(server):
    url = server["url"]
    image = vessel(4)
    _, seg = call(url, "/v1/segment", {"images": [{"data": png64(image)}]})
    mask = unpng(seg["results"][0]["mask_png"]) > 0
    mask[10:14, 10:40] = True  # the user's correction, a loop with a hole included
    mask[20:30, 20:22] = mask[20:30, 30:32] = True
    body = {"image": {"data": png64(image)}, "mask": png64(mask.astype(np.uint8) * 255), "name": "case_01"}
    status, saved = call(url, "/v1/annotations", body)
    assert status == 200, saved
    data = server["root"] / "data"
    entries = json.loads((data / "annotations.json").read_text())
    assert entries[0]["image"] == "case_01.png" and (data / "case_01.png").is_file()
    h, w = mask.shape
    back = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(entries[0]["mask"][0], h, w))).astype(bool)
    assert (back == mask).all()
    second = {"image": {"data": png64(vessel(5))}, "name": "case_02"}
    _, seg2 = call(url, "/v1/segment", {"images": [{"data": png64(vessel(5))}]})
    second["mask"] = seg2["results"][0]["mask_png"]
    assert call(url, "/v1/annotations", second)[0] == 200  # a split needs two images
    assert (
        vseg_main(["check", "data=polygons", f"data.annotations={data / 'annotations.json'}", "data.image_size=null"])
        == 0
    )
    assert call(url, "/v1/annotations", body)[0] == 200  # saving again replaces the entry
    assert len(json.loads((data / "annotations.json").read_text())) == 2


def test_model_switch(server):
    url = server["url"]
    before = call(url, "/v1/model")[1]["switches"]
    status, info = call(url, "/v1/model", {"ckpt": "random"})
    assert status == 200 and info["switches"] == before + 1 and info["state"] == "ready"
    assert call(url, "/v1/segment", {"images": [{"data": png64(vessel(5))}]})[0] == 200


def test_bad_requests_are_4xx_json(server):
    url, root = server["url"], server["root"]
    good = png64(vessel(0))
    big = png64(np.zeros((600, 600, 3), np.uint8))
    outside = root / "secret.png"
    Image.fromarray(vessel(0)).save(outside)
    cases = [
        ("GET", "/v1/nope", None, None, 404),
        ("GET", "/v1/segment", None, None, 405),
        ("POST", "/v1/segment", None, b"{not json", 400),
        ("POST", "/v1/segment", None, b"", 400),
        ("POST", "/v1/segment", {"images": []}, None, 422),
        ("POST", "/v1/segment", {"imgs": [{"data": good}]}, None, 422),
        ("POST", "/v1/segment", {"images": [{"data": "!!notbase64!!"}]}, None, 400),
        ("POST", "/v1/segment", {"images": [{"data": base64.b64encode(b"hello").decode()}]}, None, 415),
        ("POST", "/v1/segment", {"images": [{"data": big}]}, None, 413),
        ("POST", "/v1/segment", {"images": [{"data": good}] * 5}, None, 413),
        ("POST", "/v1/segment", {"images": [{"data": good}], "prompt": "x" * 201}, None, 413),
        ("POST", "/v1/segment", {"images": [{"data": good}], "prompt": "It is [SEG]"}, None, 422),
        ("POST", "/v1/segment", {"images": [{"data": good}], "answer": "guess"}, None, 422),
        ("POST", "/v1/segment", {"images": [{"data": good}], "threshold": 1.5}, None, 422),
        ("POST", "/v1/segment", {"images": [{"data": good}], "formats": ["jpeg"]}, None, 422),
        ("POST", "/v1/segment", {"images": [{"data": good}, {"data": good}], "prompts": ["a"]}, None, 422),
        ("POST", "/v1/segment", {"images": [{"path": str(outside)}]}, None, 403),
        ("POST", "/v1/segment", {"images": [{"path": str(root / "files" / "../secret.png")}]}, None, 403),
        ("POST", "/v1/segment", {"images": [{"path": str(root / "files" / "none.png")}]}, None, 404),
        ("POST", "/v1/segment", {"images": [{"data": good, "path": "x"}]}, None, 422),
        ("POST", "/v1/refine", {"image": {"data": good}, "points": [[1, 1]], "labels": []}, None, 422),
        ("POST", "/v1/refine", {"image": {"data": good}, "points": [[900, 1]], "labels": [1]}, None, 422),
        ("POST", "/v1/refine", {"image": {"data": good}, "points": [[1, 1]] * 9, "labels": [1] * 9}, None, 413),
        ("POST", "/v1/chat", {"image": {"data": good}}, None, 422),
        ("POST", "/v1/annotations", {"image": {"data": good}, "mask": good, "name": "../evil"}, None, 422),
        (
            "POST",
            "/v1/annotations",
            {"image": {"data": good}, "mask": png64(np.zeros((5, 5), np.uint8)), "name": "a"},
            None,
            422,
        ),
        ("POST", "/v1/model", {"ckpt": "/etc"}, None, 403),
        ("POST", "/v1/model", {}, None, 422),
        ("GET", "/v1/jobs/0123456789ab", None, None, 404),
        ("POST", "/v1/jobs", {"overrides": ["trainer.max_steps=-3"]}, None, 422),
        ("POST", "/v1/jobs", {"overrides": ["run_dir=/tmp/x"]}, None, 422),
        ("POST", "/v1/jobs", {"overrides": ["data=folders", "data.root=/etc"]}, None, 403),
        ("POST", "/v1/jobs", {"overrides": ["nosuchkey=1"]}, None, 422),
        ("POST", "/v1/segment", {"images": [{"data": good}]}, None, "text/plain"),
    ]
    for method, path, body, raw, expected in cases:
        headers = {"Content-Type": "text/plain"} if expected == "text/plain" else None
        status, out = call(url, path, body, method=method, raw=raw, headers=headers)
        expected = 415 if expected == "text/plain" else expected
        assert status == expected, (method, path, str(body)[:80], status, out)
        assert isinstance(out, dict) and isinstance(out.get("error"), str) and out["error"], (path, out)
        assert "Traceback" not in out["error"]
    assert len(cases) >= 15
    # a body over max_upload_bytes is refused from its Content-Length, before it is read
    import http.client

    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
    conn.putrequest("POST", "/v1/segment")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", "2000001")
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and "max_upload_bytes" in json.loads(response.read())["error"]
    conn.close()
    assert call(url, "/health")[0] == 200  # still serving


def test_token_and_config_errors(tmp_path):
    running = Running(
        config_from_args(["ckpt=random", "model=tiny", "device=cpu", f"port={free_port()}", "token=s3cret"])
    )
    try:
        body = {"images": [{"data": png64(vessel(0))}]}
        assert call(running.url, "/v1/segment", body)[0] == 401
        assert call(running.url, "/v1/segment", body, headers={"Authorization": "Bearer wrong"})[0] == 401
        assert call(running.url, "/v1/segment", body, headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert call(running.url, "/health")[0] == 200  # health stays open for load balancers
    finally:
        running.stop()
    assert vseg_main(["serve", "ckpt=random"]) == 2  # random needs model=
    assert vseg_main(["serve", "ckpt=random", "model=tiny", "host=0.0.0.0"]) == 2  # exposed without a token
    assert vseg_main(["serve", "ckpt=random", "model=tiny", "devices=[0,2]"]) == 2  # no GPUs here
    yaml_file = tmp_path / "serve.yaml"
    yaml_file.write_text("ckpt: random\nmodel: tiny\nport: 9123\nmax_batch_size: 4\n")
    cfg = config_from_args(["--config", str(yaml_file), "port=9124"])
    assert (cfg.port, cfg.max_batch_size, cfg.model["name"]) == (9124, 4, "tiny")


@pytest.mark.slow
def test_load_300_requests_8_clients(server):
    images = [png64(vessel(i)) for i in range(8)]

    def one(i):
        start = time.perf_counter()
        status, _ = call(server["url"], "/v1/segment", {"images": [{"data": images[i % 8]}]})
        return status, time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(300)))
    wall = time.perf_counter() - start
    latencies = sorted(t for _, t in results)
    errors = [s for s, _ in results if s != 200]
    p50, p95 = statistics.median(latencies), latencies[int(0.95 * len(latencies)) - 1]
    print(f"\nload: 300 requests, 8 clients, {300 / wall:.1f} req/s, p50 {1000 * p50:.0f} ms, p95 {1000 * p95:.0f} ms")
    assert not errors, f"{len(errors)} errors: {errors[:5]}"


def _wait(url: str, job: str, states: tuple[str, ...], timeout: float = 400) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status, info = call(url, f"/v1/jobs/{job}")
        assert status == 200, info
        if info["state"] in states:
            return info
        time.sleep(1)
    raise AssertionError(f"job {job} did not reach {states}: {info}")


@pytest.mark.slow
def test_jobs_done_cancelled_served_and_after_restart(server):
    url = server["url"]
    tiny = [
        "data.num_samples=8",
        "data.batch_size=2",
        "trainer.val_check_interval=2",
        "trainer.num_sanity_val_steps=0",
        "trainer.log_every_n_steps=1",
    ]
    status, job = call(url, "/v1/jobs", {"overrides": [*tiny, "trainer.max_steps=2", "checkpoint.every_n_steps=2"]})
    assert status == 201, job
    assert call(url, "/v1/jobs", {"overrides": tiny})[0] == 409  # max_jobs=1
    done = _wait(url, job["id"], ("done", "failed", "interrupted"))
    assert done["state"] == "done" and done["returncode"] == 0, call(url, f"/v1/jobs/{job['id']}/log")[1][-2000:]
    assert done["step"] >= 1 and "loss" in done["losses"] and done["val_dice"] is not None and done["weights"]
    assert "train" in call(url, f"/v1/jobs/{job['id']}/log")[1].lower()
    # serve the finished run without a restart
    status, info = call(url, "/v1/model", {"job": job["id"]})
    assert status == 200 and info["ckpt"] == done["run_dir"] and info["form"] == "run"
    assert call(url, "/v1/segment", {"images": [{"data": png64(vessel(0))}]})[0] == 200

    long = [*tiny, "trainer.max_steps=100000", "checkpoint.every_n_steps=100000"]
    status, job2 = call(url, "/v1/jobs", {"overrides": long})
    assert status == 201, job2
    running = _wait(url, job2["id"], ("running",))
    deadline = time.time() + 300
    while (running.get("step") or 0) < 1 and time.time() < deadline:
        time.sleep(1)
        running = call(url, f"/v1/jobs/{job2['id']}")[1]
    assert call(url, f"/v1/jobs/{job2['id']}", method="DELETE")[0] == 200
    stopped = _wait(url, job2["id"], ("cancelled", "failed", "done", "interrupted"))
    assert stopped["state"] == "cancelled" and stopped["returncode"] == 143, stopped
    assert stopped["checkpoints"], "SIGTERM must leave a checkpoint"
    assert call(url, "/v1/model", {"job": job2["id"]})[0] == 409

    # a new manager over the same folder (a restarted server) reports the same, from disk
    from vseg.serve.jobs import JobManager

    again = JobManager(server["running"].service.cfg)
    assert [again.status(j)["state"] for j in (job["id"], job2["id"])] == ["done", "cancelled"]
    assert Path(again.status(job["id"])["run_dir"]).is_dir()

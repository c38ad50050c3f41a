"""The server's queue, errors, auth, readiness, load and shutdown, with a fake pipeline (no model: fast, controllable).

Each fake image is a flat colour of (prompt, seed), so a test can tell whose image came back.
"""

import base64
import concurrent.futures
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from PIL import Image  # noqa: E402

from conftest_serve import FakePipeline, LiveServer, colour, free_socket, metric, wait_healthy  # noqa: E402
from sana.safety import REPLACEMENT_PROMPT, ShieldGemma, WordList  # noqa: E402
from sana.serve import create_app  # noqa: E402
from sana.serve.app import MAX_BODY_BYTES  # noqa: E402

GENERATIONS = "/v1/images/generations"


def _client(server, key="unused"):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=30)


def _image(item: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))


def _wait_for(condition, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _metrics(server) -> str:
    return httpx.get(f"{server.url}/metrics").text


# ---------------------------------------------------------------------------------------------------------
# Readiness


def test_health_is_503_until_the_model_is_loaded_and_warmed_up():
    release = threading.Event()
    fake = FakePipeline()

    def loader():
        assert release.wait(20)
        return fake

    with LiveServer(create_app(loader=loader), wait_healthy=False) as server:
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        early = httpx.post(f"{server.url}{GENERATIONS}", json={"prompt": "a cat"})
        assert early.status_code == 503 and early.json()["error"]["code"] == "loading"
        assert early.headers["retry-after"] == "5"
        assert metric(_metrics(server), "sana_ready") == 0
        release.set()
        assert wait_healthy(server.url, 20)["model"] == "fake"
        assert fake.calls[0] == (["warm-up"], [0]), "ready only after one warm-up generation"
        assert metric(_metrics(server), "sana_ready") == 1
        assert httpx.post(f"{server.url}{GENERATIONS}", json={"prompt": "a cat"}).status_code == 200


def test_a_model_that_fails_to_load_is_reported():
    def loader():
        raise OSError("no weights in /nowhere")

    with LiveServer(create_app(loader=loader), wait_healthy=False) as server:
        _wait_for(lambda: httpx.get(f"{server.url}/health").json()["status"] == "failed", what="failed state")
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 503 and "no weights in /nowhere" in health.json()["error"]
        answer = httpx.post(f"{server.url}{GENERATIONS}", json={"prompt": "a cat"})
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "model_failed"


def test_create_app_checks_its_arguments():
    with pytest.raises(ValueError, match="either a pipeline or a loader"):
        create_app()
    with pytest.raises(ValueError, match="API key is empty"):
        create_app(FakePipeline(), api_key=" ")
    with pytest.raises(ValueError, match="max_batch"):
        create_app(FakePipeline(), max_batch=0)


# ---------------------------------------------------------------------------------------------------------
# API key


def test_api_key_enforcement():
    with LiveServer(create_app(FakePipeline(), api_key="s3cret")) as server:
        missing = httpx.post(f"{server.url}{GENERATIONS}", json={"prompt": "a cat"})
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert missing.json()["error"]["code"] == "missing_api_key"
        with pytest.raises(openai.AuthenticationError):
            _client(server, "s3cret").images.generate(prompt="a cat", extra_headers={"Authorization": "Basic eDp5"})
        with pytest.raises(openai.PermissionDeniedError) as info:
            _client(server, "wrong").images.generate(prompt="a cat")
        assert info.value.body["code"] == "invalid_api_key"
        ok = _client(server, "s3cret").images.generate(prompt="a cat", response_format="url")
        # The page, health and metrics stay open; so do image URLs (the random token is the capability).
        for path in ("/", "/health", "/metrics", ok.data[0].url.removeprefix(server.url)):
            assert httpx.get(f"{server.url}{path}").status_code == 200, path
        for path in ("/v1/models", "/v1/progress/abc"):
            assert httpx.get(f"{server.url}{path}").status_code == 401, path
        models = httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer s3cret"}).json()
        assert models["data"][0]["id"] == "fake"
        assert 'sana_errors_total{type="invalid_api_key"} 1' in _metrics(server)


# ---------------------------------------------------------------------------------------------------------
# Queue: 429, disconnects, timeouts, progress


def test_a_full_queue_answers_429_with_retry_after():
    gate = threading.Event()
    fake = FakePipeline(gate=gate)
    with LiveServer(create_app(fake, max_batch=1, max_wait_ms=0, queue_size=1)) as server:
        client = _client(server)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            running = pool.submit(client.images.generate, prompt="running")
            assert fake.started.wait(10)
            queued = pool.submit(client.images.generate, prompt="queued")
            _wait_for(lambda: server.service.batcher.depth == 1, what="one queued request")
            with pytest.raises(openai.RateLimitError) as info:
                client.images.generate(prompt="refused")
            retry_after = int(info.value.response.headers["retry-after"])
            assert 1 <= retry_after <= 60 and info.value.body["code"] == "queue_full"
            gate.set()
            assert running.result(10).data[0].revised_prompt == "running"
            assert queued.result(10).data[0].revised_prompt == "queued"
        assert "refused" not in fake.generated_prompts()


def _raw_post(port: int, body: dict) -> socket.socket:
    """Send a request on a raw socket and return it without reading the answer."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = f"POST {GENERATIONS} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    sock.sendall(f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_a_client_that_disconnects_has_its_queued_work_cancelled():
    gate = threading.Event()
    fake = FakePipeline(gate=gate)
    with LiveServer(create_app(fake, max_batch=1, max_wait_ms=0)) as server:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            running = pool.submit(httpx.post, f"{server.url}{GENERATIONS}", json={"prompt": "running"}, timeout=30)
            assert fake.started.wait(10)
            sock = _raw_post(server.port, {"prompt": "abandoned"})
            _wait_for(lambda: server.service.batcher.depth == 1, what="the request to be queued")
            sock.close()
            _wait_for(lambda: server.service.batcher.depth == 0, what="the queued request to be dropped")
            gate.set()
            assert running.result(10).status_code == 200
        time.sleep(0.2)  # the worker would have started the abandoned request by now
        assert fake.generated_prompts() == ["running"]
        text = _metrics(server)
        assert metric(text, 'sana_errors_total{type="client_disconnected"}') == 1
        assert metric(text, 'sana_requests_total{status="499"}') == 1


def test_a_request_not_answered_in_time_gets_504_and_is_not_generated():
    gate = threading.Event()
    fake = FakePipeline(gate=gate, steps=3)
    with LiveServer(create_app(fake, max_batch=1, max_wait_ms=0, request_timeout_s=0.5)) as server:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            slow = pool.submit(httpx.post, f"{server.url}{GENERATIONS}", json={"prompt": "slow"}, timeout=30)
            assert fake.started.wait(10)
            late = pool.submit(httpx.post, f"{server.url}{GENERATIONS}", json={"prompt": "late"}, timeout=30)
            for answer in (slow.result(10), late.result(10)):
                assert answer.status_code == 504 and answer.json()["error"]["code"] == "timeout"
        gate.set()
        time.sleep(0.2)
        assert fake.generated_prompts() == ["slow"], "the timed-out queued request must not be generated"
        assert metric(_metrics(server), 'sana_errors_total{type="timeout"}') == 2


def test_progress_reports_queue_position_then_sampling_steps():
    gate = threading.Event()
    fake = FakePipeline(gate=gate, steps=3)
    with LiveServer(create_app(fake, max_batch=1, max_wait_ms=0)) as server:
        progress = lambda pid: httpx.get(f"{server.url}/v1/progress/{pid}")  # noqa: E731
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(
                httpx.post, f"{server.url}{GENERATIONS}", json={"prompt": "a", "progress_id": "first"}, timeout=30
            )
            assert fake.started.wait(10)
            second = pool.submit(
                httpx.post, f"{server.url}{GENERATIONS}", json={"prompt": "b", "progress_id": "second"}, timeout=30
            )
            _wait_for(lambda: progress("second").status_code == 200, what="the second request")
            assert progress("first").json() | {"step": 0} == dict(
                state="running", step=0, steps=3, images_done=0, n=1, queue_position=None
            )
            assert progress("second").json()["state"] == "queued"
            assert progress("second").json()["queue_position"] == 0
            gate.set()
            assert first.result(10).status_code == 200 and second.result(10).status_code == 200
        assert progress("first").status_code == 404, "answered requests are forgotten"
        bad = httpx.post(f"{server.url}{GENERATIONS}", json={"prompt": "a", "progress_id": "../x"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "progress_id"


# ---------------------------------------------------------------------------------------------------------
# Safety, end to end


def test_word_list_safety_replaces_the_prompt_end_to_end():
    fake = FakePipeline()
    with LiveServer(create_app(fake, safety=WordList(["forbidden"]))) as server:
        client = _client(server)
        answer = client.images.generate(prompt="a FORBIDDEN thing", extra_body={"seed": 1})
        assert answer.data[0].revised_prompt == REPLACEMENT_PROMPT and answer.model_extra["flagged"] is True
        image = Image.open(io.BytesIO(base64.b64decode(answer.data[0].b64_json)))
        meta = json.loads(image.text["sana"])
        assert meta["prompt"] == REPLACEMENT_PROMPT and meta["safety_replaced"] is True
        assert image.getpixel((0, 0)) == colour(REPLACEMENT_PROMPT, 1)
        safe = client.images.generate(prompt="a forbiddenly nice thing")
        assert safe.data[0].revised_prompt == "a forbiddenly nice thing" and safe.model_extra["flagged"] is False
        assert fake.generated_prompts() == [REPLACEMENT_PROMPT, "a forbiddenly nice thing"]


def test_shieldgemma_safety_replaces_the_prompt_end_to_end():
    from test_safety import force_p_yes, tiny_lm, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    checker = ShieldGemma(tokenizer, tiny_lm(len(tokenizer)))
    force_p_yes(checker, 0.6)
    fake = FakePipeline()
    with LiveServer(create_app(fake, safety=checker)) as server:
        answer = _client(server).images.generate(prompt="something the model dislikes")
        assert answer.data[0].revised_prompt == "A red heart." and answer.model_extra["flagged"] is True
        force_p_yes(checker, 0.1)
        answer = _client(server).images.generate(prompt="a bowl of ramen")
        assert answer.data[0].revised_prompt == "a bowl of ramen" and answer.model_extra["flagged"] is False
    assert fake.generated_prompts() == ["A red heart.", "a bowl of ramen"]


# ---------------------------------------------------------------------------------------------------------
# Malformed requests


def test_malformed_and_oversized_bodies_are_clear_4xx(tmp_path):
    with LiveServer(create_app(FakePipeline())) as server:
        url = f"{server.url}{GENERATIONS}"
        cases = [
            (b'{"prompt": "a cat"', "application/json", 400, "invalid_json"),
            (b"[1, 2]", "application/json", 400, "invalid_value"),
            (b'{"prompt": "a cat"}', "text/plain", 400, "invalid_value"),
            (b"{}", "application/json", 400, "missing_field"),
            (b'{"prompt": "a", "n": "2"}', "application/json", 400, "invalid_value"),
            (b'{"prompt": "a", "guidance": NaN}', "application/json", 400, "invalid_value"),
            (b'{"prompt": "a", "seed": 1e400}', "application/json", 400, "invalid_value"),
        ]
        for body, content_type, status, code in cases:
            answer = httpx.post(url, content=body, headers={"Content-Type": content_type})
            assert answer.status_code == status, (body, answer.text)
            error = answer.json()["error"]
            assert error["code"] == code and error["message"] and "\n" not in error["message"], (body, error)
        huge = httpx.post(url, content=b"x" * (MAX_BODY_BYTES + 1), headers={"Content-Type": "application/json"})
        assert huge.status_code == 413 and huge.json()["error"]["code"] == "too_large"

        def chunks():  # no Content-Length: the limit counts the bytes received
            yield b'{"prompt": "'
            for _ in range(20):
                yield b"x" * 65536
            yield b'"}'

        chunked = httpx.post(url, content=chunks(), headers={"Content-Type": "application/json"})
        assert chunked.status_code == 413, chunked.text


def test_fuzzed_requests_never_cause_a_server_error():
    """Hypothesis: random JSON, wrong types, huge prompts, odd sizes: always 200 or a JSON 4xx, never a 500."""
    pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from starlette.testclient import TestClient

    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    anything = st.recursive(
        scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=8
    )
    sizes = st.from_regex(r"-?[0-9]{1,5}x-?[0-9]{1,5}", fullmatch=True) | st.sampled_from(["auto", "64x64", "0x0", "x"])
    fields = {
        "n": st.integers(-1, 4) | anything,
        "size": sizes | anything,
        "response_format": st.sampled_from(["b64_json", "url", "png"]) | anything,
        "seed": st.integers(-(2**70), 2**70) | anything,
        "steps": st.integers(-5, 120) | anything,
        "guidance": st.floats(allow_nan=True, allow_infinity=True) | anything,
        "negative_prompt": st.text(max_size=30) | anything,
        "model": st.text(max_size=10) | anything,
        "user": st.text(max_size=10) | anything,
        "progress_id": st.text(max_size=70) | anything,
    }
    prompts = st.text(min_size=1, max_size=30) | st.text(min_size=1990, max_size=2100) | anything
    structured = st.fixed_dictionaries({"prompt": prompts}, optional=fields)
    unknown = st.dictionaries(st.text(max_size=10), anything, max_size=4)
    bodies = (structured | structured.flatmap(lambda d: unknown.map(lambda u: {**u, **d}))).map(json.dumps)
    bodies = bodies.map(str.encode) | anything.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=300)
    statuses = []
    fake = FakePipeline(steps=1)
    app = create_app(fake, max_batch=4, max_wait_ms=0, max_images=3)

    with TestClient(app, raise_server_exceptions=True) as client:
        _wait_for(lambda: client.get("/health").status_code == 200, what="health")

        @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
        @given(bodies)
        def check(body: bytes):
            answer = client.post(GENERATIONS, content=body, headers={"Content-Type": "application/json"})
            assert answer.status_code in (200, 400), (body[:200], answer.status_code, answer.text[:300])
            payload = answer.json()
            statuses.append(answer.status_code)
            if answer.status_code == 200:
                request = json.loads(body)
                assert len(payload["data"]) == (request.get("n") or 1)
            else:
                assert isinstance(payload["error"]["message"], str) and payload["error"]["message"]

        check()
    assert statuses.count(200) >= 5 and statuses.count(400) >= 5, "the strategies must reach both outcomes"
    assert len(fake.calls) > 1


# ---------------------------------------------------------------------------------------------------------
# Load


def test_load_every_request_gets_its_own_image_or_a_429():
    """200 requests from 32 concurrent clients: each gets its own image (prompt, seed and pixels) or a 429."""
    fake = FakePipeline(steps=2, step_delay=0.005)
    app = create_app(fake, max_batch=8, max_wait_ms=20, queue_size=16)
    total, workers, budget_s = 200, 32, 120
    with LiveServer(app) as server:

        def one(i: int):
            prompt, seed = f"load test prompt {i}", 1000 + i
            with httpx.Client(timeout=60) as http:
                answer = http.post(f"{server.url}{GENERATIONS}", json={"prompt": prompt, "seed": seed, "size": "64x64"})
            return i, prompt, seed, answer

        start = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(one, range(total), timeout=budget_s))
        seconds = time.monotonic() - start
        served = set()
        for _, prompt, seed, answer in results:
            assert answer.status_code in (200, 429), answer.text
            if answer.status_code == 429:
                assert int(answer.headers["retry-after"]) >= 1
                continue
            (item,) = answer.json()["data"]
            assert (item["revised_prompt"], item["seed"]) == (prompt, seed)
            image = _image(item)
            assert image.size == (64, 64) and image.getpixel((0, 0)) == colour(prompt, seed)
            assert json.loads(image.text["sana"])["seed"] == seed
            served.add((prompt, seed))
        statuses = [r[3].status_code for r in results]
        ok = statuses.count(200)
        assert ok + statuses.count(429) == total and len(served) == ok > 0
        generated = [(p, s) for prompts, seeds in fake.calls for p, s in zip(prompts, seeds, strict=True)]
        generated.remove(("warm-up", 0))
        assert sorted(generated) == sorted(served), "every generated image was answered once, no more"
        text = _metrics(server)
        assert metric(text, "sana_images_served_total") == ok
        assert metric(text, 'sana_requests_total{status="200"}') == ok
        batches = metric(text, "sana_batch_size_count")
        assert metric(text, 'sana_batch_size_bucket{le="1"}') < batches, "some batches must hold several images"
        assert metric(text, "sana_batch_size_sum") == ok
        assert metric(text, "sana_request_duration_seconds_count") == ok
        assert metric(text, "sana_queue_depth") == 0
        assert seconds < budget_s


# ---------------------------------------------------------------------------------------------------------
# Page and metrics format


def test_the_page_and_its_files_are_served_without_external_resources():
    with LiveServer(create_app(FakePipeline())) as server:
        page = httpx.get(f"{server.url}/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert 'id="prompt"' in page.text and 'id="gallery"' in page.text and "/static/app.js" in page.text
        for name, media in (("app.js", "text/javascript"), ("style.css", "text/css")):
            asset = httpx.get(f"{server.url}/static/{name}")
            assert asset.status_code == 200 and asset.headers["content-type"].startswith(media)
            assert "http://" not in asset.text and "https://" not in asset.text
        assert "http" not in page.text.replace("http-equiv", "")
        assert httpx.get(f"{server.url}/static/index.html").status_code == 404
        assert httpx.get(f"{server.url}/static/../app.py").status_code == 404


def test_metrics_are_prometheus_text():
    with LiveServer(create_app(FakePipeline())) as server:
        httpx.post(f"{server.url}{GENERATIONS}", json={"prompt": "a cat", "n": 2})
        httpx.post(f"{server.url}{GENERATIONS}", json={"prompt": "a cat", "n": 99})
        answer = httpx.get(f"{server.url}/metrics")
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = answer.text
    for family in ("sana_queue_depth", "sana_batch_size", "sana_request_duration_seconds", "sana_images_served_total"):
        assert f"# TYPE {family} " in text
    assert metric(text, "sana_images_served_total") == 2
    assert metric(text, 'sana_errors_total{type="invalid_value"}') == 1
    assert metric(text, 'sana_requests_total{status="400"}') == 1
    assert (
        metric(text, 'sana_batch_size_bucket{le="2"}') == 1 and metric(text, 'sana_batch_size_bucket{le="+Inf"}') == 1
    )
    assert 'sana_model_info{model="fake",sampler="flow_dpm_solver"} 1' in text
    for line in text.splitlines():
        assert line.startswith("#") or len(line.split(" ")) == 2, line


# ---------------------------------------------------------------------------------------------------------
# Graceful shutdown


def test_sigterm_finishes_the_requests_in_flight_then_exits():
    """A real process: 6 requests in flight (2 running, 4 queued); SIGTERM; all 6 get images, new ones are refused."""
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    script = Path(__file__).with_name("conftest_serve.py")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, str(script), str(port), "0.25"], stderr=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, 60)
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [
                pool.submit(httpx.post, f"{url}{GENERATIONS}", json={"prompt": f"p{i}", "seed": i}, timeout=60)
                for i in range(6)
            ]
            _wait_for(
                lambda: metric(httpx.get(f"{url}/metrics").text, "sana_requests_in_flight") == 6,
                what="6 requests in flight",
            )
            process.send_signal(signal.SIGTERM)
            refused = False
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not refused:
                try:
                    httpx.get(f"{url}/health", timeout=2)
                except httpx.TransportError:
                    refused = True
                time.sleep(0.05)
            assert refused, "after SIGTERM the server must stop accepting connections"
            answers = [f.result(60) for f in futures]
        for i, answer in enumerate(answers):
            assert answer.status_code == 200, answer.text
            (item,) = answer.json()["data"]
            assert (item["revised_prompt"], item["seed"]) == (f"p{i}", i)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode in (0, -signal.SIGTERM), stderr.decode()[-2000:]
    assert b"Traceback" not in stderr, stderr.decode()[-2000:]

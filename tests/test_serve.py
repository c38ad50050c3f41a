"""The server with the tiny random pipeline, through the official `openai` client on a live uvicorn server."""

import base64
import concurrent.futures
import io

import httpx
import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from PIL import Image  # noqa: E402

import sana  # noqa: E402
from conftest_serve import LiveServer, metric, tiny_pipeline_dir  # noqa: E402
from sana.outputs import a1111_parameters, read_png_parameters  # noqa: E402
from sana.serve import create_app  # noqa: E402

FAST = {"steps": 1, "guidance": 0.0}  # one step, no CFG: the cheapest generation


@pytest.fixture(scope="module")
def folder():
    return tiny_pipeline_dir()


@pytest.fixture(scope="module")
def server(folder):
    pipe = sana.Pipeline.from_pretrained(folder, device="cpu", progress=False)
    with LiveServer(create_app(pipe, max_batch=4, max_wait_ms=300, max_images=3)) as live:
        yield live


@pytest.fixture(scope="module")
def reference(folder):
    """A second copy of the pipeline, called directly in the test thread."""
    return sana.Pipeline.from_pretrained(folder, device="cpu", progress=False)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _png(b64: str) -> bytes:
    return base64.b64decode(b64)


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def test_health_reports_the_models_settings(server):
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["default_size"] == 512 and health["max_side"] == 1024
    assert health["max_images"] == 3 and health["sampler"] == "flow_dpm_solver"


def test_openai_client_gets_pngs_of_the_asked_size_with_their_parameters(client, tmp_path):
    answer = client.images.generate(
        prompt="a red fox in the snow", n=2, size="64x96", response_format="b64_json", extra_body={"seed": 5, **FAST}
    )
    assert len(answer.data) == 2
    extra = answer.model_extra
    assert extra["seed"] == 5 and extra["steps"] == 1 and extra["flagged"] is False and answer.size == "64x96"
    for i, item in enumerate(answer.data):
        png = _png(item.b64_json)
        image = Image.open(io.BytesIO(png))
        assert image.format == "PNG" and image.size == (64, 96)  # (width, height)
        assert item.revised_prompt == "a red fox in the snow" and item.model_extra["seed"] == 5 + i
        path = tmp_path / f"{i}.png"
        path.write_bytes(png)
        params = read_png_parameters(path)
        assert params["prompt"] == "a red fox in the snow" and params["seed"] == 5 + i
        assert (params["width"], params["height"], params["steps"], params["guidance"]) == (64, 96, 1, 0.0)
        assert params["sampler"] == "flow_dpm_solver" and params["software"].startswith("sana ")
        assert image.text["parameters"] == a1111_parameters(params)


def test_images_equal_a_direct_call_with_their_seed_whatever_batch_they_share(server, reference):
    """Three concurrent requests share a batch; image i of each equals pipe(prompt, seed=seed + i) alone."""
    before = httpx.get(f"{server.url}/metrics").text
    requests = [("a bowl of ramen", 11, 1), ("a red fox in the snow", 20, 2), ("a cat", 7, 1)]

    def send(prompt, seed, n):
        body = {"prompt": prompt, "seed": seed, "n": n, "size": "64x64", **FAST}
        return httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda r: send(*r), requests))
    after = httpx.get(f"{server.url}/metrics").text
    batches = metric(after, "sana_batch_size_count") - metric(before, "sana_batch_size_count")
    images = metric(after, "sana_batch_size_sum") - metric(before, "sana_batch_size_sum")
    assert images == 4 and batches <= 2, f"concurrent compatible requests must share batches, got {batches} batches"
    for (prompt, seed, n), answer in zip(requests, answers, strict=True):
        assert answer.status_code == 200, answer.text
        data = answer.json()["data"]
        assert len(data) == n
        for i, item in enumerate(data):
            assert item["seed"] == seed + i
            alone = reference(prompt, height=64, width=64, seed=seed + i, progress=False, **FAST)[0]
            diff = np.abs(_pixels(_png(item["b64_json"])) - np.asarray(alone, dtype=np.int16)).max()
            assert diff <= 2, f"{prompt!r} seed {seed + i}: differs from the direct call by {diff} levels"


def test_url_format_serves_the_same_png_bytes(client, server):
    kwargs = dict(prompt="a cat", size="64x64", extra_body={"seed": 3, **FAST})
    by_url = client.images.generate(response_format="url", **kwargs)
    by_b64 = client.images.generate(response_format="b64_json", **kwargs)
    url = by_url.data[0].url
    assert url.startswith(f"{server.url}/v1/images/files/") and url.endswith(".png")
    fetched = httpx.get(url)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert fetched.content == _png(by_b64.data[0].b64_json)
    assert httpx.get(f"{server.url}/v1/images/files/not-a-token.png").status_code == 404


@pytest.mark.parametrize(
    "kwargs, param, words",
    [
        (dict(size="100x100"), "size", "multiples of 32"),
        (dict(size="4096x4096"), "size", "1024"),
        (dict(size="big"), "size", "WIDTHxHEIGHT"),
        (dict(n=0), "n", "greater than or equal to 1"),
        (dict(n=4), "n", "between 1 and 3"),
        (dict(extra_body={"steps": 0}), "steps", "greater than or equal to 1"),
        (dict(extra_body={"steps": 101}), "steps", "less than or equal to 100"),
        (dict(extra_body={"guidance": 25}), "guidance", "less than or equal to 20"),
        (dict(extra_body={"seed": -1}), "seed", "greater than or equal to 0"),
        (dict(prompt="   "), "prompt", "must not be empty"),
        (dict(prompt="x" * 2001), "prompt", "at most 2000 characters"),
        (dict(quality="hd"), "quality", "unknown field 'quality'"),
        (dict(extra_body={"sampler": "euler"}), "sampler", "unknown field 'sampler'"),
        (dict(response_format="svg"), "response_format", "response_format"),
    ],
)
def test_invalid_requests_are_bad_request_errors_naming_the_field(client, kwargs, param, words):
    kwargs = {"prompt": "a cat", **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(**kwargs)
    error = info.value.body
    assert info.value.status_code == 400 and error["param"] == param and words in error["message"], error


def test_unknown_paths_and_methods_are_json_errors(server):
    missing = httpx.get(f"{server.url}/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong_method = httpx.get(f"{server.url}/v1/images/generations")
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()

"""`sana serve` wiring (sana.serve.cli): options, one-line errors, and a real process serving the tiny pipeline."""

import argparse
import os
import signal
import subprocess
import sys

import httpx
import pytest

from conftest_serve import free_socket, tiny_pipeline_dir, wait_healthy
from sana.errors import SanaError
from sana.serve.cli import add_serve_command

# What the `sana` command does with the subcommand (sana.cli.build_parser + main), for a process of its own.
MAIN = """
import argparse, sys
from sana.errors import SanaError
from sana.serve.cli import add_serve_command
parser = argparse.ArgumentParser(prog="sana")
add_serve_command(parser.add_subparsers(dest="command"))
args = parser.parse_args(sys.argv[1:])
try:
    sys.exit(args.func(args))
except SanaError as e:
    sys.exit(f"sana serve: error: {e}")
"""


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sana")
    add_serve_command(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


def test_defaults_and_options():
    args = _parse()
    assert (args.model, args.host, args.port, args.max_batch, args.max_wait_ms) == (
        "sana-600m-1024",
        "127.0.0.1",
        8000,
        4,
        20,
    )
    assert (args.queue_size, args.max_images, args.timeout, args.safety, args.safety_threshold) == (
        64,
        4,
        300,
        "off",
        0.2,
    )
    args = _parse("--model", "x", "--port", "9000", "--safety", "words", "--safety-words", "w.txt", "--max-batch", "8")
    assert (args.model, args.port, args.safety, args.safety_words, args.max_batch) == ("x", 9000, "words", "w.txt", 8)


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--max-batch", "0"], "--max-batch must be >= 1"),
        (["--queue-size", "0"], "--queue-size must be >= 1"),
        (["--timeout", "0"], "--timeout"),
        (["--port", "70000"], "--port"),
        (["--api-key-file", "/no/such/key"], "cannot read the API key file"),
        (["--safety", "words"], "needs a word list"),
    ],
)
def test_bad_options_are_one_line_errors(argv, words):
    args = _parse(*argv)
    with pytest.raises(SanaError, match=words):
        args.func(args)


def test_building_the_parser_does_not_import_the_server():
    code = (
        "import sys, sana.serve, sana.serve.cli; assert 'fastapi' not in sys.modules and 'uvicorn' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_sana_serve_process_serves_with_an_api_key_and_stops_on_sigterm(tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    key_file = tmp_path / "key"
    key_file.write_text("k3y\n")
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    argv = ["serve", "--model", str(tiny_pipeline_dir()), "--port", str(port), "--device", "cpu"]
    argv += ["--api-key-file", str(key_file), "--log-level", "warning"]
    process = subprocess.Popen(
        [sys.executable, "-c", MAIN, *argv], stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    url = f"http://127.0.0.1:{port}"
    try:
        health = wait_healthy(url, 120)
        assert health["api_key_required"] is True and health["default_size"] == 512
        body = {"prompt": "a cat", "size": "64x64", "steps": 1, "guidance": 0, "seed": 1}
        assert httpx.post(f"{url}/v1/images/generations", json=body, timeout=60).status_code == 401
        answer = httpx.post(
            f"{url}/v1/images/generations", json=body, headers={"Authorization": "Bearer k3y"}, timeout=60
        )
        assert answer.status_code == 200 and answer.json()["data"][0]["seed"] == 1
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode in (0, -signal.SIGTERM), stderr.decode()[-2000:]
    assert b"Traceback" not in stderr


def test_a_missing_model_is_one_line_on_stderr(tmp_path):
    argv = ["serve", "--model", str(tmp_path / "nowhere"), "--port", "0"]
    done = subprocess.run([sys.executable, "-c", MAIN, *argv], capture_output=True, timeout=120)
    lines = done.stderr.decode().strip().splitlines()
    assert done.returncode != 0 and lines[-1].startswith("sana serve: error:") and "nowhere" in lines[-1]
    assert b"Traceback" not in done.stderr

from __future__ import annotations

import threading
import time

import httpx
from starlette.testclient import TestClient

from promptcache.api.app import build_app
from promptcache.api.server import BackgroundServer
from promptcache.config import EngineConfig, ServerConfig
from promptcache.engine.base import Engine
from promptcache.engine.fake import FakeEngine
from promptcache.service import Service


def test_health_and_models() -> None:
    service = Service(FakeEngine(), ServerConfig())
    with TestClient(build_app(service)) as client:
        health = client.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        models = client.get("/v1/models").json()
        assert models["data"][0]["id"] == "gemma-3-270m"
        assert models["first_id"] == models["last_id"] == "gemma-3-270m"
        assert models["object"] == "list" and models["has_more"] is False


def test_models_lists_an_embedded_model_chosen_by_name() -> None:
    config = ServerConfig(engine=EngineConfig(model="smollm2-135m-instruct"))
    with TestClient(build_app(Service(FakeEngine(), config))) as client:
        models = client.get("/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["smollm2-135m-instruct"]


def test_health_reports_loading_then_ready() -> None:
    gate = threading.Event()

    def slow_engine() -> Engine:
        gate.wait(30)
        return FakeEngine()

    service = Service(slow_engine, ServerConfig())
    with TestClient(build_app(service)) as client:
        loading = client.get("/health")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        # No tiers before the engine (they move its bytes): the cache reads as empty.
        assert client.get("/metrics").status_code == 200
        stats = client.get("/v1/cache/stats")
        assert stats.status_code == 200 and stats.json()["total"]["requests"] == 0
        dashboard = client.get("/v1/cache/dashboard").json()
        assert dashboard["entries"] == [] and dashboard["tiers"] == []
        busy = client.post(
            "/v1/messages",
            headers={"anthropic-version": "2023-06-01"},
            json={"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert busy.status_code == 529
        # When to come back, in the headers the official SDKs read (they would otherwise give
        # up after ~1.5 s of their own backoff).
        assert busy.headers["retry-after"] == "2" and busy.headers["retry-after-ms"] == "2000"
        assert "x-should-retry" not in busy.headers
        gate.set()
        deadline = time.monotonic() + 30
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert client.get("/health").status_code == 200


def test_failed_load_is_reported() -> None:
    def broken() -> Engine:
        raise OSError("no such model")

    service = Service(broken, ServerConfig())
    with TestClient(build_app(service)) as client:
        deadline = time.monotonic() + 30
        while client.get("/health").json()["status"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.01)
        health = client.get("/health").json()
        assert health["status"] == "error" and "no such model" in health["error"]
        # Retrying cannot help: the SDKs are told not to.
        chat = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
        failed = client.post("/v1/chat/completions", json=chat)
        assert failed.status_code == 503 and "no such model" in failed.json()["error"]["message"]
        assert failed.headers["x-should-retry"] == "false" and "retry-after" not in failed.headers


def test_client_disconnect_stops_generation() -> None:
    engine = FakeEngine(reply_tokens=10**9)
    service = Service(engine, ServerConfig())
    server = BackgroundServer(service).start(timeout_s=30)
    try:
        body = {
            "model": "m",
            "max_tokens": 10**8,
            "stream": True,
            "messages": [{"role": "user", "content": "go on forever"}],
        }
        headers = {"anthropic-version": "2023-06-01"}
        with httpx.stream(
            "POST", f"{server.base_url}/v1/messages", json=body, headers=headers, timeout=30
        ) as response:
            for line in response.iter_lines():
                if line.startswith("event: content_block_delta"):
                    break
            assert service.worker.num_jobs == 1
        deadline = time.monotonic() + 30
        while service.worker.num_jobs and time.monotonic() < deadline:
            time.sleep(0.01)
        assert service.worker.num_jobs == 0
    finally:
        server.stop()

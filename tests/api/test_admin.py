from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from starlette.testclient import TestClient

from promptcache.api.app import build_app
from promptcache.config import ApiConfig, CacheConfig, ServerConfig
from promptcache.engine.fake import FakeEngine
from promptcache.service import Service
from promptcache.types import BlockHash
from tests.conftest import words

HEADERS = {"anthropic-version": "2023-06-01"}
BODY = {
    "model": "m",
    "max_tokens": 4,
    "system": [{"type": "text", "text": words(1500), "cache_control": {"type": "ephemeral"}}],
    "messages": [{"role": "user", "content": "hi"}],
}


def service(**api: object) -> Service:
    return Service(FakeEngine(), replace(ServerConfig(), api=replace(ApiConfig(), **api)))


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


def test_metrics_count_hits_misses_tokens_and_ttft() -> None:
    with TestClient(build_app(service())) as client:
        first = client.post("/v1/messages", headers=HEADERS, json=BODY).json()["usage"]
        client.post("/v1/messages", headers=HEADERS, json=BODY)
        text = client.get("/metrics").text
    written = first["cache_creation_input_tokens"]
    assert metric(text, 'promptcache_requests_total{outcome="miss"}') == 1
    assert metric(text, 'promptcache_requests_total{outcome="hit"}') == 1
    assert metric(text, "promptcache_cache_read_tokens_total") == written
    assert metric(text, 'promptcache_cache_written_tokens_total{ttl="5m"}') == written
    assert metric(text, "promptcache_prefill_tokens_saved_total") == written
    assert metric(text, 'promptcache_time_to_first_token_seconds_count{outcome="hit"}') == 1
    assert metric(text, 'promptcache_cache_entries{tier="host"}') == 1
    assert metric(text, 'promptcache_cache_bytes{tier="host"}') > 0


def test_metrics_show_pins_in_flight_keys_peak_bytes_and_rss() -> None:
    svc = service()
    with TestClient(build_app(svc)) as client:
        client.post("/v1/messages", headers=HEADERS, json=BODY)
        idle = client.get("/metrics").text
        (entry,) = svc.store.entries()
        svc.store.pin(entry)
        keys = [BlockHash(b"k1"), BlockHash(b"k2")]
        svc.inflight.begin(keys)
        busy = client.get("/metrics").text
        svc.store.unpin(entry)
        for key in keys:
            svc.inflight.finish(key)
        again = client.get("/metrics").text
    assert metric(idle, "promptcache_cache_pinned_entries") == 0
    assert metric(idle, "promptcache_inflight_keys") == 0
    assert metric(busy, "promptcache_cache_pinned_entries") == 1
    assert metric(busy, "promptcache_inflight_keys") == 2
    assert metric(again, "promptcache_cache_pinned_entries") == 0
    assert metric(again, "promptcache_inflight_keys") == 0
    used = metric(idle, 'promptcache_cache_bytes{tier="host"}')
    assert 0 < used <= metric(idle, 'promptcache_cache_peak_bytes{tier="host"}')
    if sys.platform.startswith("linux"):
        assert metric(idle, "process_resident_memory_bytes") > 0


def test_entries_listing_and_clear_need_an_admin_key() -> None:
    svc = service(admin_keys=frozenset({"root"}))
    with TestClient(build_app(svc)) as client:
        client.post("/v1/messages", headers=HEADERS, json=BODY)
        assert client.get("/v1/cache/entries").status_code == 403
        assert client.get("/v1/cache/entries", headers={"x-api-key": "nope"}).status_code == 403
        listing = client.get("/v1/cache/entries", headers={"authorization": "Bearer root"})
        assert listing.status_code == 200
        (entry,) = listing.json()["data"]
        assert entry["ttl"] == "5m" and 0 < entry["ttl_left_s"] <= 300
        assert entry["tokens"] > 1024 and entry["tier"] == "host" and entry["hits"] == 0
        assert entry["tenant"] != "default" and len(entry["tenant"]) == 12
        cleared = client.delete("/v1/cache/entries", headers={"x-api-key": "root"})
        assert cleared.json() == {"cleared": 1}
        again = client.post("/v1/messages", headers=HEADERS, json=BODY).json()["usage"]
        assert again["cache_read_input_tokens"] == 0


def test_admin_is_off_without_admin_keys() -> None:
    with TestClient(build_app(service())) as client:
        assert client.get("/v1/cache/entries").status_code == 403


def test_metrics_and_listing_show_tiers_and_moves(tmp_path: Path) -> None:
    config = replace(
        ServerConfig(),
        api=replace(ApiConfig(), admin_keys=frozenset({"root"})),
        cache=replace(CacheConfig(), capacity_bytes=64 * 1600, disk_dir=tmp_path),
    )
    other = {**BODY, "system": [{**BODY["system"][0], "text": words(1400, 9)}]}  # type: ignore[index]
    with TestClient(build_app(Service(FakeEngine(), config))) as client:
        client.post("/v1/messages", headers=HEADERS, json=BODY)
        client.post("/v1/messages", headers=HEADERS, json=other)  # pushes BODY's entry to disk
        hit = client.post("/v1/messages", headers=HEADERS, json=BODY).json()["usage"]
        text = client.get("/metrics").text
        listing = client.get("/v1/cache/entries", headers={"x-api-key": "root"}).json()["data"]
    assert hit["cache_read_input_tokens"] > 1024
    assert metric(text, 'promptcache_cache_entries{tier="host"}') == 1
    assert metric(text, 'promptcache_cache_entries{tier="disk"}') == 1
    # The hit kept its file as a copy: a later demotion writes nothing.
    assert metric(text, 'promptcache_cache_copies{tier="disk"}') == 1
    assert metric(text, 'promptcache_cache_bytes{tier="disk"}') > 64 * 1400
    assert metric(text, 'promptcache_cache_capacity_bytes{tier="host"}') == 64 * 1600
    assert metric(text, 'promptcache_cache_demotions_total{reason="capacity",tier="host"}') == 2
    assert metric(text, 'promptcache_cache_promotions_total{reason="hit",tier="disk"}') == 1
    assert [e["tier"] for e in listing] == ["host", "disk"]  # most recently used first
    assert [e["copies"] for e in listing] == [["disk"], []]

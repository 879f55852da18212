"""``promptcache bench`` end to end (fake engine), its argument checks, lazy imports, and the peer
runner's process handling (with a stand-in server; the real peers are not part of the suite)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from promptcache import cli
from promptcache.api.server import BackgroundServer
from promptcache.bench import peers
from promptcache.config import ServerConfig
from promptcache.engine.fake import FakeEngine
from promptcache.service import Service
from tests.conftest import make_service

FIXTURE = Path(__file__).parent / "fixtures" / "recorded.json"


def test_cli_import_loads_no_benchmark_machinery() -> None:
    code = (
        "import sys, promptcache.cli as c; c._parser(); "
        "heavy = [m for m in ('promptcache.bench.peers', 'promptcache.bench.client', "
        "'matplotlib', 'httpx', 'tqdm') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "[]"


def test_dry_run_prints_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "qa", "--dry-run", "--documents", "5", "--questions", "2"]) == 0
    out = capsys.readouterr().out
    assert "10 requests, 5 with a prefix sent before" in out
    assert "arrival=rounds" in out
    assert cli.main(["bench", "qa", "--dry-run", "--arrival", "rolling"]) == 0
    assert "arrival=rolling" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench"], "name a workload"),
        (["bench", "--peers", "qa"], "write the workload first: promptcache bench qa --peers"),
        (["bench", "qa"], "either --target URL or --peers"),
        (["bench", "qa", "--target", "http://x", "--peers"], "either --target URL or --peers"),
        (["bench", "qa", "--target", "http://x", "--concurrency", "0"], "at least 1"),
        (["bench", "qa", "--peers", "vllm"], "unknown peers"),
        (
            ["bench", "qa", "--peers", "llama-cpp", "--peers-python", "/nonexistent/python"],
            "llama-cpp-python[server]",
        ),
    ],
)
def test_argument_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_bench_waits_for_a_target_still_loading_its_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def slow() -> FakeEngine:
        time.sleep(1.5)
        return FakeEngine()

    server = BackgroundServer(Service(slow, ServerConfig())).start(timeout_s=60, wait_ready=False)
    try:
        assert httpx.get(f"{server.base_url}/health").status_code == 503
        argv = ["bench", "chat", "--target", server.base_url, "--out", str(tmp_path)]
        argv += ["--conversations", "1", "--turns", "2", "--scale", "0.25", "--no-progress"]
        assert cli.main([*argv, "--no-plots"]) == 0  # every request answered
    finally:
        server.stop()
    assert f"waiting for {server.base_url} to load its model" in capsys.readouterr().err
    (run,) = json.loads((tmp_path / "chat.json").read_text())["runs"]
    assert [r["error"] for r in run["requests"]] == [None, None]


def test_bench_does_not_wait_for_a_model_that_failed_to_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken() -> FakeEngine:
        raise OSError("no such model")

    server = BackgroundServer(Service(broken, ServerConfig())).start(timeout_s=60, wait_ready=False)
    try:
        deadline = time.monotonic() + 30
        while httpx.get(f"{server.base_url}/health").json()["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        argv = ["bench", "chat", "--target", server.base_url, "--out", str(tmp_path)]
        argv += ["--conversations", "1", "--turns", "1", "--scale", "0.25", "--no-progress"]
        started = time.monotonic()
        assert cli.main([*argv, "--no-plots", "--no-warmup"]) == 1  # its requests failed
        assert time.monotonic() - started < 60  # not the 900 s of --timeout
    finally:
        server.stop()
    captured = capsys.readouterr()
    assert "waiting for" not in captured.err and "no such model" in captured.out


def test_replay_renders_table_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "--replay", str(FIXTURE), "--out", str(tmp_path), "--price-input", "1"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "llama-cpp-python*" in out and "($1/$15 per MTok in/out)" in out
    for name in ("recorded-ttft.png", "recorded-cost.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def fake_server() -> Iterator[str]:
    server = BackgroundServer(make_service()).start(timeout_s=60)
    try:
        yield server.base_url
    finally:
        server.stop()


def test_bench_against_a_target_writes_json_and_plots(
    fake_server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "chat", "--target", fake_server, "--out", str(tmp_path), "--seed", "21"]
    argv += ["--conversations", "2", "--turns", "2", "--scale", "0.25", "--no-progress"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "workload chat: 4 requests per run" in out
    data = json.loads((tmp_path / "chat.json").read_text())
    (run,) = data["runs"]
    assert run["label"] == fake_server and run["protocol"] == "anthropic"
    assert len(run["requests"]) == 4 and run["summary"]["hit"]["n"] == 2
    assert run["summary"]["saving"] is not None
    assert (tmp_path / "chat-ttft.png").exists() and (tmp_path / "chat-cost.png").exists()
    cold = ["bench", "chat", "--target", fake_server, "--out", str(tmp_path), "--cold"]
    assert cli.main([*cold, "--seed", "21", "--scale", "0.25", "--no-plots", "--no-progress"]) == 0
    cold_run = json.loads((tmp_path / "chat-cold.json").read_text())["runs"][0]
    assert cold_run["cold"] and cold_run["summary"]["cache_read_tokens"] == 0


def test_peer_server_is_started_on_loopback_and_stopped(tmp_path: Path) -> None:
    port = peers.free_port()
    argv = (sys.executable, "-m", "http.server", "--bind", peers.LOOPBACK, str(port))
    server = peers.Server("stand-in", argv, port, "/", 30)
    with peers.running(server, tmp_path / "stand-in.log") as handle:
        url = handle.url
        assert url == f"http://127.0.0.1:{port}"
        assert httpx.get(url + "/").status_code == 200
        assert handle.died() is None
        handle.proc.kill()
        handle.proc.wait()
        log = tmp_path / "stand-in.log"
        assert handle.died() == f"stand-in killed (out of memory?) during the run; log {log}"
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/", timeout=2)


def test_peer_server_that_dies_reports_its_log(tmp_path: Path) -> None:
    argv = (sys.executable, "-c", "print('no model here'); raise SystemExit(3)")
    server = peers.Server("broken", argv, peers.free_port(), "/", 30)
    with (
        pytest.raises(RuntimeError, match=r"(?s)exited with 3.*no model here"),
        peers.running(server, tmp_path / "broken.log"),
    ):
        pass


def test_peer_commands_listen_on_loopback_only() -> None:
    pc = peers.promptcache_server(8123)
    assert pc.argv[1:4] == ("-m", "promptcache", "serve") and "127.0.0.1" in pc.argv
    llama = peers.llama_cpp_server(Path("py"), Path("m.gguf"), 8124, threads=2)
    args = dict(zip(llama.argv[3::2], llama.argv[4::2], strict=False))
    assert args["--host"] == "127.0.0.1" and args["--cache"] == "true"
    assert args["--cache_type"] == "ram" and args["--n_threads"] == "2"
    assert args["--logits_all"] == "false" and args["--interrupt_requests"] == "false"


def test_bench_sees_the_server_only_through_http() -> None:
    import ast

    root = Path(peers.__file__).parent
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not name.startswith("promptcache.") or name.startswith("promptcache.bench")
                assert name.split(".")[0] not in ("torch", "transformers"), path


def test_sigterm_still_stops_the_peer_servers(tmp_path: Path) -> None:
    code = f"""
import sys, time
from pathlib import Path
from promptcache.bench import peers
port = peers.free_port()
argv = (sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port))
server = peers.Server("s", argv, port, "/", 30)
with peers._terminate_cleanly():
    with peers.running(server, Path({str(tmp_path)!r}) / "s.log") as h:
        print(h.proc.pid, flush=True)
        time.sleep(60)
"""
    with subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True
    ) as parent:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        parent.terminate()
        assert parent.wait(timeout=30) == 128 + 15
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)


def test_peer_runs_default_to_the_1h_ttl() -> None:
    from promptcache.bench import command

    parser = cli._parser()
    plain = parser.parse_args(["bench", "qa", "--target", "http://x"])
    peer = parser.parse_args(["bench", "qa", "--peers"])
    chosen = parser.parse_args(["bench", "qa", "--peers", "--ttl", "5m"])
    assert command.build_workload(plain).params["ttl"] == "5m"
    assert command.build_workload(peer).params["ttl"] == "1h"
    assert command.build_workload(chosen).params["ttl"] == "5m"
    req = command.build_workload(peer).requests[0]
    assert req.system[0].cache == "1h"


def test_llama_server_peer_has_a_slot_per_request_in_flight() -> None:
    server = peers.llama_server(Path("llama-server"), Path("m.gguf"), 8125, threads=2, slots=8)
    argv = server.argv
    opts = {a: argv[i + 1] for i, a in enumerate(argv) if a.startswith("--") and i + 1 < len(argv)}
    assert opts["--host"] == "127.0.0.1" and opts["--port"] == "8125"
    assert opts["--parallel"] == "8" and opts["--ctx-size"] == str(8 * 8192)
    assert opts["--cache-reuse"] == "256" and opts["--threads"] == "2"
    assert "--cache-prompt" in argv and "--cont-batching" in argv
    assert server.health_path == "/health"


def test_missing_llama_server_names_the_setup_script(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "qa", "--peers", "llama-server", "--llama-server", "/nonexistent/ls"]
    assert cli.main(argv) == 2
    assert "scripts/setup-peers" in capsys.readouterr().err


def test_decode_defaults_to_its_clients_in_flight(
    fake_server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "decode", "--target", fake_server, "--out", str(tmp_path), "--clients", "3"]
    assert cli.main([*argv, "--max-tokens", "12", "--no-progress", "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "workload decode: 3 requests per run, concurrency 3" in out
    (run,) = json.loads((tmp_path / "decode.json").read_text())["runs"]
    assert run["summary"]["decode_rate"]["n"] >= 1
    assert all(r["content_chunks"] >= 1 for r in run["requests"])


def test_peers_with_concurrency_run_the_whole_schedule_on_each_in_turn(
    fake_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from promptcache.bench import command

    seen: list[list[str]] = []

    def fake_run_peers(
        plan: peers.PeerPlan, out_dir: Path, protocol: str, run_all: peers.RunAll
    ) -> list[object]:
        assert plan.slots == 2  # llama-server gets one slot per request in flight
        slots = [
            peers.Slot("promptcache", fake_server, protocol, False),
            peers.Slot("promptcache (cold)", fake_server, protocol, True),
        ]
        runs = run_all(slots)
        seen.append([r.label for r in runs])
        return list(runs)

    monkeypatch.setattr(peers, "run_peers", fake_run_peers)
    argv = ["bench", "decode", "--peers", "promptcache,cold", "--concurrency", "2"]
    argv += ["--clients", "2", "--max-tokens", "6", "--out", str(tmp_path), "--no-progress"]
    assert command.run(cli._parser().parse_args(["bench", *argv[1:]])) == 0
    assert seen == [["promptcache", "promptcache (cold)"]]
    data = json.loads((tmp_path / "decode.json").read_text())
    assert data["concurrency"] == 2
    for run in data["runs"]:
        starts = sorted(r["start_s"] for r in run["requests"])
        # Both clients' requests went out together: batching, not turn-taking.
        assert len(starts) == 2 and starts[1] - starts[0] < 1.0

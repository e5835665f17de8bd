"""The graph explorer's server: listing, reading, validated atomic saves, feature cards, and the
safety rules (paths stay inside the served directory, body limit, loopback host names, same-origin
saves). Requests go through a real uvicorn server with ``http.client``, which sends paths exactly as
written (``..`` and percent-encodings are not normalised away by the client)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from explorer_fixtures import SCAN, SEQUENCES, free_port, make_graph_json, make_store, serve_command

pytest.importorskip("starlette", reason="the server extra: pip install 'mechscope[server]'")
import uvicorn  # noqa: E402

from mechscope.errors import BadInputError, MechscopeError  # noqa: E402
from mechscope.server.app import STATIC_DIR, create_app  # noqa: E402
from mechscope.server.config import ServeConfig  # noqa: E402

SECRET = "top secret outside the served directory"


class LiveServer:
    """``create_app(config)`` served by uvicorn on a free loopback port in a thread."""

    def __init__(self, config_kwargs: dict, host: str = "127.0.0.1"):
        self.port, self.host = free_port(), host
        self.config = ServeConfig(host=host, port=self.port, **config_kwargs)
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.config), host=host, port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                chunked: bool = False) -> tuple[int, dict, bytes]:
        con = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            con.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
            response = con.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            con.close()

    def put_json(self, path: str, data, headers: dict | None = None) -> tuple[int, dict]:
        status, _, body = self.request("PUT", path, json.dumps(data).encode(),
                                       {"Content-Type": "application/json", **(headers or {})})
        return status, json.loads(body)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def served(tmp_path):
    """A served directory with a graph, a nested graph, junk files, a secret outside and symlinks out."""
    root = tmp_path / "graphs"
    (root / "runs").mkdir(parents=True)
    (root / "texas.json").write_text(json.dumps(make_graph_json("texas")))
    (root / "runs" / "again.json").write_text(json.dumps(make_graph_json("again")))
    (root / "notes.json").write_text('{"not": "a graph"}')
    (root / "broken.json").write_text("{")
    (root / ".texas.json.tmp123").write_text("half-written")
    (tmp_path / "secret.json").write_text(json.dumps(make_graph_json(SECRET)))
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "x.json").write_text(json.dumps(make_graph_json(SECRET)))
    (root / "link.json").symlink_to(tmp_path / "secret.json")
    (root / "linkdir").symlink_to(tmp_path / "outside")
    make_store(tmp_path / "store.sqlite")
    server = LiveServer({"directory": root, "store": tmp_path / "store.sqlite"})
    yield server, root, tmp_path
    server.stop()


def test_lists_every_graph_inside_and_nothing_else(served):
    server, root, _ = served
    status, headers, body = server.request("GET", "/api/graphs")
    assert status == 200
    listing = json.loads(body)
    assert [g["name"] for g in listing["graphs"]] == ["runs/again.json", "texas.json"]
    texas = listing["graphs"][1]
    assert texas["n_nodes"] == len(make_graph_json()["nodes"]) and texas["scan"] == SCAN
    assert texas["bytes"] == (root / "texas.json").stat().st_size and texas["n_supernodes"] == 0
    assert SECRET not in body.decode()


def test_serves_the_graph_file_byte_for_byte(served):
    server, root, _ = served
    for name in ("texas.json", "runs/again.json"):
        status, headers, body = server.request("GET", f"/api/graphs/{name}")
        assert status == 200 and body == (root / name).read_bytes()
        assert headers["content-type"].startswith("application/json")


@pytest.mark.parametrize("path, get_status, put_status", [
    ("/api/graphs/../secret.json", 403, 403),
    ("/api/graphs/runs/../../secret.json", 403, 403),
    ("/api/graphs/%2e%2e/secret.json", 403, 403),
    ("/api/graphs/%2E%2E%2Fsecret.json", 403, 403),
    ("/api/graphs/runs%2F..%2F..%2Fsecret.json", 403, 403),
    ("/api/graphs/..%5csecret.json", 403, 403),
    ("/api/graphs//etc/passwd", 403, 403),
    ("/api/graphs/%2Fetc%2Fpasswd", 403, 403),
    ("/api/graphs/%252e%252e/secret.json", 404, 404),  # decoded once: a name "%2e%2e/...", not found
    ("/api/graphs/link.json", 403, 403),
    ("/api/graphs/linkdir/x.json", 403, 403),
    ("/api/graphs/.texas.json.tmp123", 403, 403),
    ("/api/graphs/texas.json%00.png", 403, 403),
    ("/static/../secret.json", 404, 405),
    ("/static/%2e%2e/app.py", 404, 405),
    ("/static/..%2Fapp.py", 404, 405),
    ("/static/%2e%2e/%2e%2e/%2e%2e/secret.json", 404, 405),
])
def test_paths_out_of_the_directory_are_refused(served, path, get_status, put_status):
    server, _, tmp = served
    status, _, body = server.request("GET", path)
    assert status == get_status, (path, status)
    assert SECRET.encode() not in body and b"def create_app" not in body
    status, _, body = server.request("PUT", path, (tmp / "secret.json").read_bytes(),
                                     {"Content-Type": "application/json"})
    assert status == put_status, (path, status)
    assert json.loads((tmp / "secret.json").read_text())["metadata"]["slug"] == SECRET


def test_save_writes_a_valid_graph_atomically(served):
    server, root, _ = served
    data = make_graph_json("texas")
    data["qParams"]["supernodes"] = [["Texas", "0_5_4", "1_7_4"]]
    data["qParams"]["pinnedIds"] = ["0_5_4", "1_7_4", "2_3_5"]
    data["nodes"][7]["clerp"] = "a new label"
    status, body = server.put_json("/api/graphs/texas.json", data, {"Origin": f"http://127.0.0.1:{server.port}"})
    assert status == 200 and body == {"saved": "texas.json", "bytes": (root / "texas.json").stat().st_size}
    assert json.loads((root / "texas.json").read_text()) == data
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == [".texas.json.tmp123"]  # no temp left
    listing = json.loads(server.request("GET", "/api/graphs")[2])
    assert {g["name"]: g["n_supernodes"] for g in listing["graphs"]} == {"runs/again.json": 0, "texas.json": 1}


def _mutations():
    def drop_nodes(d):
        del d["nodes"]

    def unknown_member(d):
        d["qParams"]["supernodes"] = [["Texas", "0_5_4", "9_9_9"]]

    def empty_label(d):
        d["qParams"]["supernodes"] = [["  ", "0_5_4"]]

    def no_members(d):
        d["qParams"]["supernodes"] = [["Texas"]]

    def unknown_pin(d):
        d["qParams"]["pinnedIds"] = ["9_9_9"]

    def dangling_link(d):
        d["links"].append({"source": "0_5_4", "target": "nowhere", "weight": 1.0})

    def wrong_type(d):
        d["nodes"][0]["ctx_idx"] = "zero"

    def repeated_node_id(d):
        d["nodes"].append(dict(d["nodes"][7]))

    def position_past_the_prompt(d):
        d["nodes"][7]["ctx_idx"] = len(d["metadata"]["prompt_tokens"])

    return [drop_nodes, unknown_member, empty_label, no_members, unknown_pin, dangling_link, wrong_type,
            repeated_node_id, position_past_the_prompt]


@pytest.mark.parametrize("mutate", _mutations(), ids=lambda f: f.__name__)
def test_invalid_graphs_are_refused_and_nothing_is_written(served, mutate):
    server, root, _ = served
    before = (root / "texas.json").read_bytes()
    data = make_graph_json("texas")
    mutate(data)
    status, body = server.put_json("/api/graphs/texas.json", data)
    assert status == 422 and body["error"]
    assert (root / "texas.json").read_bytes() == before


def test_saves_need_json_an_existing_file_and_the_same_origin(served):
    server, root, _ = served
    before = (root / "texas.json").read_bytes()
    data = json.dumps(make_graph_json()).encode()
    assert server.request("PUT", "/api/graphs/texas.json", b"{nope", {"Content-Type": "application/json"})[0] == 400
    assert server.request("PUT", "/api/graphs/texas.json", data, {"Content-Type": "text/plain"})[0] == 415
    assert server.request("PUT", "/api/graphs/texas.json", b"[1, 2]", {"Content-Type": "application/json"})[0] == 422
    assert server.put_json("/api/graphs/texas.json", make_graph_json(), {"Origin": "http://evil.example"})[0] == 403
    status, body = server.put_json("/api/graphs/new.json", make_graph_json())
    assert status == 404 and not (root / "new.json").exists()
    assert server.request("POST", "/api/graphs/texas.json", data, {"Content-Type": "application/json"})[0] == 405
    assert (root / "texas.json").read_bytes() == before


def test_saves_refuse_what_cannot_be_read_back_and_keep_the_file_mode(served):
    server, root, _ = served
    path = root / "texas.json"
    path.chmod(0o640)
    before = path.read_bytes()
    valid = json.dumps(make_graph_json()).encode()
    headers = {"Content-Type": "application/json"}
    status, _, reply = server.request("PUT", "/api/graphs/texas.json", valid.replace(b'"influence": 0.1,', b'"influence": NaN,'), headers)
    assert status == 400 and b"NaN is not JSON" in reply
    assert server.request("PUT", "/api/graphs/texas.json", b"[" * 100_000 + b"]" * 100_000, headers)[0] == 400
    deep_body = valid.replace(b'"info": {', b'"info": {"deep": ' + b"[" * 5000 + b"]" * 5000 + b", ", 1)
    assert server.request("PUT", "/api/graphs/texas.json", deep_body, headers)[0] in (400, 422)
    surrogate = make_graph_json()
    surrogate["metadata"]["prompt"] = "\ud800"
    status, reply = server.put_json("/api/graphs/texas.json", surrogate)
    assert status == 422 and "cannot be saved" in reply["error"]
    for origin in ("https://127.0.0.1:%d" % server.port, "null", "file://"):
        assert server.put_json("/api/graphs/texas.json", make_graph_json(), {"Origin": origin})[0] == 403
    assert path.read_bytes() == before and server.request("GET", "/api/graphs")[0] == 200
    status, reply = server.put_json("/api/graphs/texas.json", make_graph_json("texas é"))
    assert status == 200 and path.stat().st_mode & 0o777 == 0o640
    assert len(path.read_bytes()) <= len(json.dumps(make_graph_json("texas é"), ensure_ascii=False).encode())


def test_odd_names_and_broken_files_give_clear_errors(served):
    server, root, tmp = served
    (root / "loop").symlink_to(root / "loop")
    (root / "loop.json").symlink_to(root / "loop.json")
    assert [g["name"] for g in json.loads(server.request("GET", "/api/graphs")[2])["graphs"]] == \
        ["runs/again.json", "texas.json"]
    for path in ("/api/graphs/loop.json", "/api/graphs/loop/x.json", "/api/graphs/" + "a" * 300 + ".json",
                 "/api/graphs/texas.json/", "/api/graphs/runs//again.json"):
        status, _, body = server.request("GET", path)
        assert status in (403, 404) and json.loads(body)["error"], path
    import sqlite3

    con = sqlite3.connect(tmp / "store.sqlite")
    con.execute("DROP TABLE examples")
    con.commit()
    con.close()
    status, _, body = server.request("GET", f"/api/features/1/7?scan={SCAN}")
    assert status == 500 and "cannot be read: no such table: examples" in json.loads(body)["error"]
    (tmp / "store.sqlite").write_bytes(b"not sqlite at all" * 100)
    status, _, body = server.request("GET", f"/api/features/1/7?scan={SCAN}")
    assert status == 500 and "not a mechscope feature store" in json.loads(body)["error"]


def test_request_bodies_over_the_limit_are_refused(tmp_path):
    root = tmp_path / "graphs"
    root.mkdir()
    (root / "g.json").write_text(json.dumps(make_graph_json()))
    before = (root / "g.json").read_bytes()
    server = LiveServer({"directory": root, "max_body_mb": 2 / 1024})  # 2 KiB
    try:
        big = make_graph_json()
        big["metadata"]["prompt"] = "x" * 4096
        body = json.dumps(big).encode()
        status, _, reply = server.request("PUT", "/api/graphs/g.json", body, {"Content-Type": "application/json"})
        assert status == 413 and b"limit of 2048 bytes" in reply
        chunks = (body[i:i + 512] for i in range(0, len(body), 512))  # no Content-Length: counted while read
        status, _, _ = server.request("PUT", "/api/graphs/g.json", chunks, {"Content-Type": "application/json"},
                                      chunked=True)
        assert status == 413
        assert (root / "g.json").read_bytes() == before
    finally:
        server.stop()


def test_only_loopback_host_names_are_answered(served):
    server, _, _ = served
    assert server.request("GET", "/api/graphs", headers={"Host": "evil.example"})[0] == 400
    assert server.request("GET", "/api/graphs", headers={"Host": f"localhost:{server.port}"})[0] == 200
    assert ServeConfig(host="127.0.0.1").loopback and ServeConfig(host="::1").loopback
    assert not ServeConfig(host="0.0.0.0").loopback
    other = LiveServer({"directory": served[1]}, host="127.0.0.2")  # any loopback address answers to its name
    try:
        assert other.request("GET", "/api/graphs")[0] == 200
        assert other.request("GET", "/api/graphs", headers={"Host": "evil.example"})[0] == 400
    finally:
        other.stop()


def test_pages_and_assets_carry_a_strict_content_security_policy(served):
    server, _, _ = served
    for path in ("/", "/static/app.js", "/static/graph-view.js", "/static/style.css", "/api/graphs"):
        status, headers, body = server.request("GET", path)
        assert status == 200, path
        assert "default-src 'self'" in headers["content-security-policy"] and headers["x-content-type-options"] == "nosniff"
    assert b'src="/static/app.js"' in server.request("GET", "/")[2]


def test_shipped_assets_load_nothing_from_the_network():
    import re

    names = sorted(p.name for p in STATIC_DIR.iterdir())
    assert names == ["app.js", "card.js", "common.js", "graph-view.js", "index.html", "style.css", "subgraph.js"]
    for path in STATIC_DIR.iterdir():
        text = path.read_text()
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"')]*", text))
        assert urls <= {"http://www.w3.org/2000/svg"}, (path.name, urls)  # the SVG namespace is not fetched
        assert "@import" not in text and "url(" not in text


def test_feature_cards_come_from_the_store(served):
    server, _, tmp = served
    status, _, body = server.request("GET", f"/api/features/1/7?scan={SCAN}")
    assert status == 200
    card = json.loads(body)  # what explorer_fixtures.make_store wrote for feature 1/7 (activation 1.5)
    assert _rounded(card) == _rounded({
        "layer": 1, "feature": 7, "label": "", "density": 0.00325, "active": 20, "max_value": 3.0,
        "hist": [1, 1, 1, 1], "hist_edges": [0, 1, 2, 3, 4],
        "top_logits": [[" Austin", 0.8], [" Texas", 0.5]], "bottom_logits": [[" Paris", -0.7], [" London", -0.31]],
        "examples": [{"tokens": SEQUENCES[0], "acts": [0, 0, 1.5, 3.0, 0, 0, 0, 0], "center": 3, "value": 3.0},
                     {"tokens": SEQUENCES[1], "acts": [0, 0, 0, 0, 0, 0, 1.125, 2.25], "center": 7, "value": 2.25}],
    })
    status, _, body = server.request("GET", f"/api/features/1/8?scan={SCAN}")
    assert status == 404 and b"not in the store" in body
    status, _, body = server.request("GET", "/api/features/1/7?scan=another-set")
    assert status == 422 and b"built for transcoders 'tiny-set-v1'" in body
    assert server.request("GET", "/api/features/1/7?scan=..")[0] == 422


def _rounded(value):
    """``value`` with every float rounded to 6 decimals (nested lists and dicts)."""
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def test_without_a_store_the_card_says_how_to_build_one(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHSCOPE_HOME", str(tmp_path / "home"))
    root = tmp_path / "graphs"
    root.mkdir()
    server = LiveServer({"directory": root})
    try:
        status, _, body = server.request("GET", f"/api/features/1/7?scan={SCAN}")
        reply = json.loads(body)
        assert status == 200 and reply["no_store"] is True  # a normal state: nothing logged as a failed request
        assert f"mechscope features build --transcoders {SCAN}" in reply["error"]
        make_store(tmp_path / "home" / "features" / f"{SCAN}.sqlite")  # the default location, found per scan
        status, _, body = server.request("GET", f"/api/features/1/7?scan={SCAN}")
        assert status == 200 and json.loads(body)["examples"]
    finally:
        server.stop()


def test_concurrent_saves_leave_one_whole_graph(served):
    server, root, _ = served
    versions = []
    for i in range(8):
        data = make_graph_json("texas")
        data["qParams"]["supernodes"] = [[f"group {i}", "0_5_4"]]
        versions.append(data)
    threads = [threading.Thread(target=server.put_json, args=("/api/graphs/texas.json", v)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert json.loads((root / "texas.json").read_text()) in versions
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == [".texas.json.tmp123"]


def test_serve_config_and_cli_errors(tmp_path, capsys):
    from mechscope.cli.main import main

    with pytest.raises(BadInputError, match="port 70000 is out of range"):
        ServeConfig(port=70000)
    with pytest.raises(BadInputError, match="max_body_mb 0"):
        ServeConfig(max_body_mb=0)
    with pytest.raises(BadInputError, match="max_body_mb inf must be a finite number"):
        ServeConfig(max_body_mb=float("inf"))
    with pytest.raises(BadInputError, match="feature store .*nope.sqlite' does not exist"):
        ServeConfig(store=tmp_path / "nope.sqlite")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    for argv, message in ((["serve", str(tmp_path / "missing")], "does not exist"),
                          (["serve", str(tmp_path), "--port", "0"], "port 0 is out of range"),
                          (["serve", str(tmp_path), "--port", str(taken.getsockname()[1])], "in use; choose another")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
    taken.close()


def test_serve_command_binds_loopback_and_serves(tmp_path):
    root = tmp_path / "graphs"
    root.mkdir()
    (root / "g.json").write_text(json.dumps(make_graph_json()))
    env = {**os.environ, "MECHSCOPE_HOME": str(tmp_path / "home")}
    with serve_command(root, env=env) as (process, port, listing):
        assert process.stdout.readline().startswith(f"mechscope explorer: http://127.0.0.1:{port}/ (1 graph in")
        assert [g["name"] for g in listing["graphs"]] == ["g.json"]
        listening = Path("/proc/net/tcp").read_text().splitlines()[1:]
        local = {line.split()[1] for line in listening if line.split()[3] == "0A"}  # state LISTEN
        assert f"0100007F:{port:04X}" in local and f"00000000:{port:04X}" not in local


def test_the_server_never_imports_torch():
    code = ("import sys; import mechscope.server.app, mechscope.cli.serve; "
            "sys.exit('torch' in sys.modules or 'transformers' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_reads_during_saves_get_one_whole_version(served):
    """A graph replaced while it is being sent: every reader gets the old or the new file, whole."""
    server, root, _ = served
    small, big = make_graph_json("texas"), make_graph_json("texas")
    big["metadata"]["prompt"] = "x" * 2_000_000
    versions = [json.dumps(v, ensure_ascii=False, separators=(",", ":")) for v in (small, big)]
    (root / "texas.json").write_text(versions[0])
    stop, seen, failures = threading.Event(), set(), []

    def save_alternately():
        i = 0
        while not stop.is_set():
            server.put_json("/api/graphs/texas.json", (small, big)[i % 2])
            i += 1

    def read():
        for _ in range(30):
            try:
                status, _, body = server.request("GET", "/api/graphs/texas.json")
                text = body.decode()
                (seen.add(versions.index(text)) if status == 200 and text in versions else failures.append(status))
            except (http.client.HTTPException, ConnectionError) as e:
                failures.append(repr(e))

    writer = threading.Thread(target=save_alternately)
    writer.start()
    readers = [threading.Thread(target=read) for _ in range(4)]
    for t in readers:
        t.start()
    for t in readers:
        t.join()
    stop.set()
    writer.join()
    assert failures == [] and seen == {0, 1}


def test_aborted_reads_close_their_files(served):
    server, root, _ = served
    big = make_graph_json("texas")
    big["metadata"]["prompt"] = "x" * 8_000_000  # several chunks
    (root / "texas.json").write_text(json.dumps(big))
    opened = lambda: sum(os.path.realpath(f"/proc/self/fd/{fd}") == str(root / "texas.json")  # noqa: E731
                         for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}"))
    for _ in range(10):
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(b"GET /api/graphs/texas.json HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        s.close()  # hang up mid-body
    deadline = time.monotonic() + 10
    while opened() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert opened() == 0


def test_serve_without_the_server_extra_names_the_install_line(tmp_path, capsys, monkeypatch):
    from mechscope.cli.main import main

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if `pip install 'mechscope[server]'` had not run
    monkeypatch.delitem(sys.modules, "mechscope.server.app")  # imported again, without it
    with pytest.raises(SystemExit) as e:
        main(["serve", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "uvicorn is missing" in err and "pip install 'mechscope[server]'" in err
    with pytest.raises(MechscopeError, match=r"pip install 'mechscope\[server\]'"):
        import mechscope.server.app  # noqa: F401  (the library API says the same)


def test_the_internal_graph_beside_an_exchange_graph_is_not_listed(tmp_path):
    """`trace` writes DIR/<slug>.json and DIR/<slug>/graph.json + graph.safetensors: one graph to explore."""
    from mechscope.server.files import GraphDirectory

    (tmp_path / "texas.json").write_text(json.dumps(make_graph_json("texas")))
    (tmp_path / "texas").mkdir()
    (tmp_path / "texas" / "graph.json").write_text("{}")
    (tmp_path / "texas" / "graph.safetensors").write_bytes(b"")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "graph.json").write_text(json.dumps(make_graph_json("other")))  # no tensors: a graph
    assert GraphDirectory(tmp_path).names() == ["other/graph.json", "texas.json"]

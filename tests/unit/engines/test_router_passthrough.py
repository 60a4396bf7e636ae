"""The router process: byte-exact forwarding, worker choice, failover, health checks, worker API."""

import time
from concurrent.futures import ThreadPoolExecutor

import requests

# Odd spacing, key order, escapes and fields no typed struct knows: all must arrive as sent.
BODY = (
    b'{"input_ids": [151644, 872,198],  "sampling_params": {"max_new_tokens": 4, "no_stop_trim": true},'
    b' "return_routed_experts": true, "routed_experts_start_len": 2,'
    b' "zz_unknown_field": {"nested": [1.50, "\\u00e9\\n"], "empty": {}}, "rid": "3-7"}'
)


def workers_by_url(router_url: str) -> dict[str, dict]:
    answer = requests.get(router_url + "/workers", timeout=10).json()
    assert answer["total"] == len(answer["workers"])
    return {w["url"]: w for w in answer["workers"]}


def wait_for(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_generate_body_arrives_byte_identical(echo_workers, start_router):
    worker = echo_workers.start()
    router = start_router([worker.url])
    for method in (requests.post, requests.put):
        resp = method(router.url + "/generate", data=BODY, headers={"Content-Type": "application/json"}, timeout=10)
        assert resp.status_code == 200
        assert worker.received[-1] == BODY  # what the engine got
        assert resp.content == BODY  # what came back
        assert resp.headers["Content-Type"] == "application/x-echo"
    assert len(worker.received) == 2


def test_streaming_passes_through(echo_workers, start_router):
    worker = echo_workers.start()
    router = start_router([worker.url])
    resp = requests.post(router.url + "/generate", data=b'{"input_ids": [1], "stream": true}', stream=True, timeout=10)
    assert resp.status_code == 200 and resp.headers["Content-Type"] == "text/event-stream"
    lines = [line for line in resp.iter_lines() if line]
    assert lines == [b'data: {"i": 0}', b'data: {"i": 1}', b'data: {"i": 2}', b"data: [DONE]"]


def test_worker_http_errors_returned_as_is_not_retried(echo_workers, start_router):
    a, b = echo_workers.start(), echo_workers.start()
    router = start_router([a.url, b.url])
    resp = requests.post(router.url + "/generate", data=b'{"text": "teapot"}', timeout=10)
    assert (resp.status_code, resp.text) == (418, "I am a teapot")
    assert resp.headers["Content-Type"].startswith("text/plain")
    assert len(a.received) + len(b.received) == 1
    assert all(w["is_healthy"] for w in workers_by_url(router.url).values())


def test_transport_failure_retries_on_another_worker(echo_workers, start_router):
    dropper, good = echo_workers.start(drop=True), echo_workers.start()
    router = start_router([dropper.url, good.url], health_check_interval_s=60.0)
    wait_for(lambda: all(w["is_healthy"] for w in workers_by_url(router.url).values()))
    for i in range(4):
        body = b'{"input_ids": [%d], "return_routed_experts": true}' % i
        resp = requests.post(router.url + "/generate", data=body, timeout=10)
        assert resp.status_code == 200 and resp.content == body
    assert len(dropper.received) == 1  # tried once, then out of rotation
    assert len(good.received) == 4
    view = workers_by_url(router.url)
    assert view[dropper.url]["is_healthy"] is False and view[dropper.url]["num_transport_failures"] == 1
    assert view[good.url]["is_healthy"] is True and view[good.url]["num_requests_total"] == 4
    assert view[dropper.url]["num_requests_total"] == 0


def test_retries_are_bounded(echo_workers, start_router):
    droppers = [echo_workers.start(drop=True) for _ in range(3)]
    router = start_router([w.url for w in droppers], max_retries=1, health_check_interval_s=60.0)
    wait_for(lambda: sum(w["is_healthy"] for w in workers_by_url(router.url).values()) == 3)
    resp = requests.post(router.url + "/generate", data=BODY, timeout=10)
    assert resp.status_code == 503
    message = resp.json()["error"]["message"]
    assert "no healthy worker" in message and "2 tried" in message and "ServerDisconnected" in message
    assert sum(len(w.received) for w in droppers) == 2  # first try + max_retries=1


def test_no_healthy_worker_is_503(start_router, dead_url):
    router = start_router([dead_url], ready=False)
    wait_for(lambda: workers_by_url(router.url)[dead_url]["is_healthy"] is False)
    resp = requests.post(router.url + "/generate", data=BODY, timeout=10)
    assert resp.status_code == 503
    assert resp.json()["error"]["message"].startswith("no healthy worker to serve /generate: 1 registered, 0 healthy")
    assert requests.get(router.url + "/readiness", timeout=10).status_code == 503
    assert requests.get(router.url + "/health", timeout=10).status_code == 200
    assert requests.get(router.url + "/liveness", timeout=10).status_code == 200
    empty = start_router([], ready=False)
    assert requests.post(empty.url + "/generate", data=BODY, timeout=10).status_code == 503


def test_least_in_flight_spreads_concurrent_requests(echo_workers, start_router):
    a, b = echo_workers.start(delay_s=0.5), echo_workers.start(delay_s=0.5)
    router = start_router([a.url, b.url])
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda i: requests.post(router.url + "/generate", data=b"[%d]" % i, timeout=10).status_code, range(8)))
    assert codes == [200] * 8
    assert (len(a.received), len(b.received)) == (4, 4)
    view = workers_by_url(router.url)
    assert view[a.url]["num_requests_total"] + view[b.url]["num_requests_total"] == 8
    assert view[a.url]["load"] == view[b.url]["load"] == 0


def test_least_in_flight_avoids_busy_worker(echo_workers, start_router):
    slow, fast = echo_workers.start(delay_s=3.0), echo_workers.start()
    router = start_router([slow.url, fast.url])
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(requests.post, router.url + "/generate", data=b"[0]", timeout=10)
        wait_for(lambda: len(slow.received) + len(fast.received) == 1)
        busy = slow if slow.received else fast
        idle = fast if busy is slow else slow
        assert workers_by_url(router.url)[busy.url]["load"] == 1
        for i in range(3):  # busy has 1 in flight, idle 0: everything goes to idle
            assert requests.post(router.url + "/generate", data=b"[%d]" % i, timeout=10).status_code == 200
        assert len(idle.received) == 3 and len(busy.received) == 1
        assert pending.result().status_code == 200


def test_round_robin_policy(echo_workers, start_router):
    a, b = echo_workers.start(), echo_workers.start()
    router = start_router([a.url, b.url], policy="round_robin")
    for i in range(6):
        assert requests.post(router.url + "/generate", data=b"[%d]" % i, timeout=10).status_code == 200
    assert (len(a.received), len(b.received)) == (3, 3)
    assert {a.received[0], b.received[0]} == {b"[0]", b"[1]"}


def test_health_checks_evict_and_readmit(echo_workers, start_router):
    a, b = echo_workers.start(), echo_workers.start()
    router = start_router([a.url, b.url], health_check_interval_s=0.1, health_check_failure_threshold=2)
    wait_for(lambda: all(w["is_healthy"] for w in workers_by_url(router.url).values()))
    a.healthy = False
    wait_for(lambda: workers_by_url(router.url)[a.url]["is_healthy"] is False)
    for i in range(4):
        assert requests.post(router.url + "/generate", data=b"[%d]" % i, timeout=10).status_code == 200
    assert len(a.received) == 0 and len(b.received) == 4
    a.healthy = True  # re-admitted on the next good probe
    wait_for(lambda: workers_by_url(router.url)[a.url]["is_healthy"] is True)
    for i in range(4):
        assert requests.post(router.url + "/generate", data=b"[%d]" % i, timeout=10).status_code == 200
    assert len(a.received) == 2 and len(b.received) == 6


def test_worker_api(echo_workers, start_router, dead_url):
    a, b = echo_workers.start(), echo_workers.start()
    router = start_router([a.url])
    resp = requests.post(router.url + "/workers", json={"url": b.url}, timeout=10)
    assert resp.status_code == 202
    added = resp.json()
    assert added["status"] == "accepted" and added["url"] == b.url and added["location"] == f"/workers/{added['worker_id']}"
    assert requests.post(router.url + "/workers", json={"url": b.url}, timeout=10).status_code == 409
    assert requests.post(router.url + "/workers", json={"nope": 1}, timeout=10).status_code == 400
    bad = requests.post(router.url + "/workers", json={"url": "localhost:1"}, timeout=10)
    assert bad.status_code == 400 and "http://host:port" in bad.json()["error"]["message"]
    assert requests.post(router.url + "/add_worker", timeout=10).status_code == 400
    wait_for(lambda: workers_by_url(router.url)[b.url]["is_healthy"])
    assert requests.get(router.url + added["location"], timeout=10).json()["url"] == b.url
    assert requests.get(router.url + "/list_workers", timeout=10).json() == {"urls": [a.url, b.url]}

    flushed = requests.post(router.url + "/flush_cache", timeout=10)
    assert flushed.json() == {"status": "success", "workers_flushed": 2}
    assert (a.num_flushes, b.num_flushes) == (1, 1)
    assert requests.get(router.url + "/model_info", timeout=10).json()["model_path"] == "echo"
    assert requests.get(router.url + "/get_model_info", timeout=10).json()["model_path"] == "echo"
    loads = requests.get(router.url + "/get_loads", timeout=10).json()["workers"]
    assert sorted(w["worker"] for w in loads) == sorted([a.url, b.url]) and all(w["load"] == 0 for w in loads)

    assert requests.delete(router.url + added["location"], timeout=10).status_code == 202
    assert requests.delete(router.url + added["location"], timeout=10).status_code == 404
    assert list(workers_by_url(router.url)) == [a.url]

    # Legacy API, as older RL code calls it.
    assert requests.post(router.url + "/add_worker", params={"url": b.url}, timeout=10).json()["status"] == "success"
    assert requests.post(router.url + "/add_worker", params={"url": b.url}, timeout=10).status_code == 200  # idempotent
    assert requests.get(router.url + "/list_workers", timeout=10).json() == {"urls": [a.url, b.url]}
    assert requests.post(router.url + "/remove_worker", params={"url": a.url}, timeout=10).json()["status"] == "success"
    assert requests.post(router.url + "/remove_worker", params={"url": a.url}, timeout=10).status_code == 404
    assert requests.get(router.url + "/list_workers", timeout=10).json() == {"urls": [b.url]}

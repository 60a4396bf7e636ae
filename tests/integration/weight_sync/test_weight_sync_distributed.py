"""DistributedWeightSender (this pytest process = rank 0) → two embedded engine subprocesses over gloo."""

import subprocess
import sys
import time

import pytest
import requests

from miles.engines.client import EngineError
from miles.weight_sync.distributed import DistributedWeightSender, iter_buckets

from .conftest import assert_same_generation, free_port, probe

BUCKET_BYTES = 64 << 10  # the tiny model is ~560 KB: several buckets


@pytest.fixture(scope="module")
def engines(start_engine, tiny_model):
    return [start_engine(tiny_model), start_engine(tiny_model)]


@pytest.fixture(scope="module")
def original_generation(engines):
    return probe(engines[0].url)


@pytest.fixture
def sender(engines):
    s = DistributedWeightSender([e.url for e in engines], "127.0.0.1", free_port(), backend="gloo", group_name="wug-test")
    s.connect()
    yield s
    s.close()


def test_sync_matches_a_fresh_engine_then_reverts_bit_identically(sender, engines, perturbed_weights, original_weights,
                                                                  original_generation, reference_generation):
    assert probe(engines[1].url)[0]["output_ids"] == original_generation[0]["output_ids"]
    expected_buckets = len(list(iter_buckets(perturbed_weights.items(), BUCKET_BYTES)))
    stats = sender.send(perturbed_weights.items(), weight_version="step-1", bucket_bytes=BUCKET_BYTES)
    assert stats.num_buckets == expected_buckets > 3
    assert stats.num_tensors == len(perturbed_weights)
    assert stats.num_bytes == sum(t.numel() * t.element_size() for t in perturbed_weights.values())
    for engine in engines:
        after = probe(engine.url)
        assert_same_generation(after, reference_generation)
        assert {o["meta_info"]["weight_version"] for o in after} == {"step-1"}
    # Back to the original weights, one flattened broadcast per bucket this time.
    stats = sender.send(original_weights.items(), weight_version="step-2", bucket_bytes=BUCKET_BYTES,
                        load_format="flattened_bucket")
    assert stats.num_buckets == expected_buckets
    for engine in engines:
        assert_same_generation(probe(engine.url), original_generation, tol=0.0)


def test_unknown_name_is_refused_and_the_group_stays_usable(sender, engines, original_weights, perturbed_weights,
                                                            reference_generation, original_generation):
    bad = [("model.layers.0.mlp.up_proj.weight", perturbed_weights["model.layers.0.mlp.up_proj.weight"]),
           ("model.layers.9.mlp.up_proj.weight", perturbed_weights["model.layers.0.mlp.up_proj.weight"])]
    with pytest.raises(EngineError) as err:
        sender.send(bad, weight_version="bad", bucket_bytes=1 << 30)
    assert "unknown weight name 'model.layers.9.mlp.up_proj.weight'" in str(err.value)
    for engine in engines:  # refused whole: the valid tensor of that bucket was not applied either
        assert_same_generation(probe(engine.url), original_generation, tol=0.0)
    sender.send(perturbed_weights.items(), weight_version="after-error", bucket_bytes=BUCKET_BYTES)
    assert_same_generation(probe(engines[0].url), reference_generation)
    sender.send(original_weights.items(), weight_version="v0", bucket_bytes=BUCKET_BYTES)


def test_group_is_destroyed_on_close_and_can_be_rebuilt(engines, original_weights):
    for _ in range(2):  # same group name twice: close() must have destroyed it on both sides
        with DistributedWeightSender([e.url for e in engines], "127.0.0.1", free_port(), group_name="wug-again") as s:
            s.send(original_weights.items(), weight_version="rebuilt")
    r = requests.post(engines[0].url + "/destroy_weights_update_group", json={"group_name": "wug-again"}, timeout=30)
    assert r.status_code == 400 and "wug-again" in r.json()["message"]
    assert probe(engines[0].url)[0]["meta_info"]["weight_version"] == "rebuilt"


def test_update_without_group_is_400(engines):
    r = requests.post(engines[0].url + "/update_weights_from_distributed",
                      json={"names": ["model.norm.weight"], "dtypes": ["float32"], "shapes": [[64]], "group_name": "nope"},
                      timeout=30)
    assert r.status_code == 400 and "no weight update group named 'nope'" in r.json()["message"]


def test_refused_join_fails_fast_instead_of_hanging(sender, engines):
    # The engines already hold "wug-test" (the sender fixture), so a second trainer process asking for it
    # is refused at once; its connect() must raise instead of waiting in the rendezvous for the timeout.
    code = f"""
import sys, time
from miles.engines.client import EngineError
from miles.weight_sync.distributed import DistributedWeightSender
s = DistributedWeightSender({[e.url for e in engines]!r}, "127.0.0.1", {free_port()}, group_name="wug-test", timeout_s=60)
t0 = time.monotonic()
try:
    s.connect()
except EngineError as exc:
    print("REFUSED after %.2f s:" % (time.monotonic() - t0), exc)
    s.close()
    sys.exit(0)
sys.exit(1)
"""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "REFUSED" in proc.stdout and "'wug-test' already exists" in proc.stdout
    assert time.monotonic() - t0 < 40  # far below the 60 s rendezvous timeout

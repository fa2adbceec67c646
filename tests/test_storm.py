"""A short retry storm with a crash (bench/storm.py runs the long one and prints figures)."""

import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location(
    "storm", Path(__file__).resolve().parents[1] / "bench" / "storm.py")


@pytest.fixture(scope="module")
def storm():
    module = importlib.util.module_from_spec(SPEC)
    SPEC.loader.exec_module(module)
    return module


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_storm_with_a_killed_worker_acknowledges_each_message_once(storm, store, tmp_path,
                                                                    request):
    if store == "redis":
        request.getfixturevalue("redis_server")  # skips, with its reason, when absent
    report = storm.run_storm(store, count=90, directory=tmp_path)
    print(f"\n{report}")
    assert report["requests"] == 270
    assert report["killed_worker"] is not None
    assert report["answered_5xx"] == 0
    # Only requests the killed worker was serving go unanswered; every message still got a
    # 200 from one of its three deliveries.
    assert report["connection_errors"] <= 3
    assert report["acknowledged_messages"] == 90
    runs = report["handler_runs_per_acknowledged_message"]
    # Exactly one run per acknowledged message, except a message whose handler was running
    # on the worker at the moment it was killed (never acknowledged there, so it ran again).
    assert set(runs) <= {1, 2}
    assert runs.get(2, 0) == report["run_twice_and_first_run_on_killed_worker"] <= 1

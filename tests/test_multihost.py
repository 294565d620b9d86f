"""pamjax.multihost: argument checks, and the one-process case of its collectives (the
multi-process case runs in tests/test_sweep.py, as a job of 2 processes)."""

from __future__ import annotations

import pytest

from pamjax import multihost
from pamjax.errors import ConfigError


@pytest.mark.parametrize("text, want", [
    ("10.0.0.1:1234", ("10.0.0.1", 1234)),
    ("node-7.cluster:65535", ("node-7.cluster", 65535)),
    ("[::1]:8476", ("::1", 8476)),
])
def test_coordinator_is_host_and_port(text, want):
    assert multihost.parse_coordinator(text) == want


@pytest.mark.parametrize("text", ["localhost", ":1234", "host:", "host:0", "host:65536",
                                  "host:12a", "my host:1234", "[]:1234"])
def test_malformed_coordinator_names_the_field(text):
    with pytest.raises(ConfigError) as info:
        multihost.parse_coordinator(text)
    assert (info.value.field, info.value.value) == ("coordinator", text)


@pytest.mark.parametrize("args, field", [
    (("h:1", None, None), "coordinator"),
    ((None, 2, 0), "coordinator"),
    (("h:1", 0, 0), "num_processes"),
    (("h:1", 2, 2), "process_id"),
    (("h:1", 2, -1), "process_id"),
    (("h:1", 2, True), "process_id"),
    (("h", 2, 0), "coordinator"),
])
def test_bad_arguments_name_the_field(args, field):
    with pytest.raises(ConfigError) as info:
        multihost.check_arguments(*args)
    assert info.value.field == field


def test_one_process_needs_no_job_and_exchanges_nothing():
    assert multihost.check_arguments(None, None, None) is False
    assert multihost.check_arguments("h:1", 1, 0) is True
    multihost.initialize(None, None, None)  # no job: nothing happens
    assert multihost.allgather_bytes(b"abc") == [b"abc"]
    assert multihost.broadcast_bytes(b"xyz") == b"xyz"
    multihost.check_same("processes", b"same", "arguments")

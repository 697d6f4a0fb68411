"""Request ids are the usage records' unique key: they must never repeat, across workers too."""

from __future__ import annotations

import os

from apps.gateway import asgi_io


def test_request_ids_are_unique_and_uuid_sized() -> None:
    ids = {asgi_io.new_request_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    assert all(len(i) == len("req_") + 32 and i.startswith("req_") for i in ids)


def test_a_forked_worker_does_not_repeat_its_parents_ids() -> None:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its first id and leave without running pytest's teardown
        os.write(write_end, asgi_io.new_request_id().encode())
        os._exit(0)
    os.close(write_end)
    child_id = os.read(read_end, 100).decode()
    os.close(read_end)
    os.waitpid(pid, 0)
    parent_id = asgi_io.new_request_id()
    assert child_id.startswith("req_") and child_id[4:20] != parent_id[4:20]

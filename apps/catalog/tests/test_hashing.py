"""sha256 of files through a memory map: the same digest as hashing the bytes, at every size."""

from __future__ import annotations

import hashlib
import os

import pytest

from apps.catalog import transfer


@pytest.mark.parametrize("size", [0, 1, 16384, 16384 * 3 + 7])
def test_the_mapped_digest_equals_hashing_the_bytes(tmp_path, monkeypatch, size) -> None:
    monkeypatch.setattr(transfer, "HASH_CHUNK", 16384)  # several slices without a large file
    data = os.urandom(size)
    path = tmp_path / "shard.safetensors"
    path.write_bytes(data)
    ticks: list[int] = []

    digest = transfer.sha256_file(path, on_chunk=lambda: ticks.append(1))

    assert digest == hashlib.sha256(data).hexdigest()
    assert len(ticks) == -(-size // 16384)  # one cancellation check per slice

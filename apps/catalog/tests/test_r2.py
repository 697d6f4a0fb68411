"""What Cloudflare R2 refuses, through the R2 front (r2_front.py), and the upload path that R2 accepts.

Issue #10, defects 9 (checksums over https) and 12 (leftover multipart uploads), plus the front's own
rules (multipart part sizes, region ``auto``, the test CA) so a regression in the double shows too.
"""

from __future__ import annotations

import os
from io import StringIO

import pytest
from botocore.exceptions import ClientError
from django.core.management import CommandError, call_command

from apps.catalog import storage
from apps.catalog.models import UploadStatus
from apps.catalog.uploads import upload_execute, upload_request

pytestmark = [pytest.mark.slow, pytest.mark.django_db]  # slow: moto behind the R2 front

MIB = 1024 * 1024


def _upload_model_sync(model, folder) -> str:
    out = StringIO()
    try:
        call_command(
            "upload_model", model.name, "--from-dir", str(folder), "--sync", "--prefix", "models/r2", stdout=out
        )
    except CommandError as exc:
        return f"{out.getvalue()}\n{exc}"
    return out.getvalue()


# --- defect 9: botocore's default checksums over https ----------------------------------------------
def test_upload_model_over_https_with_botocores_default_checksums_is_refused_as_r2_refuses_it(
    r2, r2_front, settings, catalog_model, model_folder
):
    settings.R2_CHECKSUMS = "when_supported"  # botocore's default, and this project's until issue #10

    out = _upload_model_sync(catalog_model, model_folder)

    catalog_model.refresh_from_db()
    assert catalog_model.latest_upload.status == UploadStatus.FAILED
    # Before issue #10 the first PUT went aws-chunked with a CRC32 trailer (401 Unauthorized); single
    # PUTs now carry our own SHA-256, but the shard's CreateMultipartUpload still asks for CRC32 (501).
    refused = {reason.split(" ", 3)[1] for reason in r2_front.refusals}
    assert refused and refused <= {"Unauthorized", "NotImplemented"}, r2_front.refusals
    assert "R2_CHECKSUMS=when_required" in catalog_model.latest_upload.error  # the error says what to change
    assert "failed" in out.lower()


def test_a_put_sent_aws_chunked_with_a_trailing_checksum_is_a_401(r2, r2_front, settings):
    settings.R2_CHECKSUMS = "when_supported"

    with pytest.raises(ClientError) as excinfo:
        storage.client().put_object(Bucket=r2, Key="models/x/config.json", Body=b"{}")  # botocore adds CRC32

    assert excinfo.value.response["Error"]["Code"] == "Unauthorized"
    assert excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"] == 401
    error = storage.translate(excinfo.value, bucket=r2, key="models/x/config.json")
    assert "R2_CHECKSUMS=when_required" in str(error)


def test_upload_model_over_https_passes_with_the_default_settings_and_r2_checks_our_sha256(
    r2, r2_front, settings, catalog_model, model_folder
):
    out = _upload_model_sync(catalog_model, model_folder)

    catalog_model.refresh_from_db()
    assert catalog_model.latest_upload.status == UploadStatus.UPLOADED, catalog_model.latest_upload.error
    assert "Uploaded 7 file(s)" in out
    assert r2_front.refusals == {}
    # Every single PUT carried our SHA-256 and the store checked it against the body; the 12 MiB shard
    # went multipart (5 MiB parts) without one, as R2 has no FULL_OBJECT SHA-256 for multipart.
    checked = {path.rsplit("/", 1)[-1] for path in r2_front.sha256_checked}
    small = {e["path"] for e in catalog_model.manifest if e["size"] < settings.R2_MULTIPART_THRESHOLD_MB * MIB}
    assert checked == small | {"crosslogic-manifest.json"}
    assert "model-00001-of-00002.safetensors" not in checked
    assert storage.request_log.keys[("UploadPart", "models/r2/model-00001-of-00002.safetensors")] == 3


def test_a_put_whose_sha256_does_not_match_its_body_is_refused(r2, r2_front):
    with pytest.raises(storage.StorageError, match="other bytes than were hashed"):
        storage.put_bytes(r2, "models/x/config.json", b"{}", sha256="0" * 64)
    assert storage.head(r2, "models/x/config.json") is None


@pytest.mark.parametrize("header", ["ChecksumCRC32", "ChecksumCRC32C", "ChecksumSHA1"])
def test_checksum_headers_r2_does_not_implement_are_a_501(r2, r2_front, header):
    values = {"ChecksumCRC32": "AAAAAA==", "ChecksumCRC32C": "AAAAAA==", "ChecksumSHA1": "A" * 27 + "="}

    with pytest.raises(ClientError) as excinfo:
        storage.client().put_object(Bucket=r2, Key="k", Body=b"x", **{header: values[header]})

    assert excinfo.value.response["Error"]["Code"] == "NotImplemented"
    assert excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"] == 501
    assert "not implemented" in excinfo.value.response["Error"]["Message"]


def test_a_crc32_multipart_upload_is_a_501(r2, r2_front):
    with pytest.raises(ClientError) as excinfo:
        storage.client().create_multipart_upload(Bucket=r2, Key="k", ChecksumAlgorithm="CRC32")
    assert excinfo.value.response["Error"]["Code"] == "NotImplemented"


# --- the front's other R2 rules ----------------------------------------------------------------------
def _multipart(bucket: str, key: str, sizes: list[int]) -> None:
    client = storage.client()
    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    parts = []
    for number, size in enumerate(sizes, start=1):
        etag = client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=os.urandom(size))[
            "ETag"
        ]
        parts.append({"PartNumber": number, "ETag": etag})
    client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts})


@pytest.mark.parametrize("sizes", [[5 * MIB, 6 * MIB, MIB], [5 * MIB, 5 * MIB, 6 * MIB]])
def test_multipart_parts_of_unequal_size_are_refused_at_completion(r2, r2_front, sizes):
    with pytest.raises(ClientError) as excinfo:
        _multipart(r2, "models/x/uneven.safetensors", sizes)

    assert excinfo.value.response["Error"]["Code"] == "InvalidPart"
    assert "non-trailing parts must have the same length" in excinfo.value.response["Error"]["Message"]
    assert storage.head(r2, "models/x/uneven.safetensors") is None


def test_multipart_parts_of_one_size_and_a_smaller_last_part_complete(r2, r2_front):
    _multipart(r2, "models/x/even.safetensors", [5 * MIB, 5 * MIB, 2 * MIB])
    assert storage.head(r2, "models/x/even.safetensors").size == 12 * MIB


def test_a_region_other_than_auto_is_refused_with_a_hint(r2, r2_front, settings):
    settings.R2_REGION = "eu-west-1"

    with pytest.raises(storage.StorageError, match="R2_REGION=auto"):
        storage.check_bucket(r2)


def test_an_endpoint_whose_ca_is_not_trusted_fails_naming_r2_ca_bundle(r2, settings, monkeypatch):
    monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
    settings.R2_CA_BUNDLE = ""  # the system store does not know the test CA

    with pytest.raises(storage.StorageUnreachableError, match="R2_CA_BUNDLE"):
        storage.check_bucket(r2)


def test_r2_check_passes_against_the_r2_front(r2, r2_front, settings):
    out = StringIO()
    call_command("r2_check", stdout=out)

    assert "Storage is ready for model uploads." in out.getvalue()
    assert r2_front.refusals == {}
    assert any("crosslogic-r2-check/" in path for path in r2_front.sha256_checked)  # the write probe


# --- defect 12: leftover multipart uploads ---------------------------------------------------------------
def _open_uploads(bucket: str) -> set[tuple[str, str]]:
    paginator = storage.client().get_paginator("list_multipart_uploads")
    return {(u["Key"], u["UploadId"]) for page in paginator.paginate(Bucket=bucket) for u in page.get("Uploads", [])}


def test_an_upload_aborts_all_its_own_leftovers_across_pages_and_none_of_a_neighbours(
    r2, r2_front, catalog_model, model_folder
):
    r2_front.list_uploads_page = 2  # R2 pages at 1000; two keeps the test small
    client = storage.client()
    big = "models/shared/model-00001-of-00002.safetensors"
    for _ in range(5):  # a worker killed five times mid-shard
        client.create_multipart_upload(Bucket=r2, Key=big)
    # Another model uploading under the same prefix right now (its key sorts first, on page one).
    neighbour = "models/shared/a-neighbour-00001-of-00001.safetensors"
    theirs = client.create_multipart_upload(Bucket=r2, Key=neighbour)["UploadId"]

    upload = upload_request(model=catalog_model, local_dir=str(model_folder), prefix="models/shared")
    assert upload_execute(upload_id=upload.pk) == "uploaded"

    assert _open_uploads(r2) == {(neighbour, theirs)}
    assert storage.request_log.operations["AbortMultipartUpload"] == 5
    assert storage.request_log.operations["ListMultipartUploads"] >= 3  # it followed the pages

"""Upload benchmark: CrossLogic's upload service vs plain boto3 ``upload_file``, side by side, in one run.

Starts moto's S3 server on a free localhost port behind the R2 front (apps/catalog/tests/r2_front.py:
https with a test CA, refusing what Cloudflare R2 refuses), writes a synthetic model (configs plus
safetensors shards totalling ``--size-mb``), then uploads it through the front, in alternating rounds:

- ``service``: apps.catalog.transfer (what the Celery task runs: sha256 per file, HEAD per
  object, parallel multipart from disk, manifest) with the project's default R2_* settings;
- ``plain``: ``boto3.client("s3").upload_file`` per file with boto3's default TransferConfig, and
  ``request_checksum_calculation="when_required"`` as Cloudflare documents for boto3 >= 1.36 (with
  botocore's default the front refuses it, as R2 does).

Each upload runs in a fresh child process that reports its own peak RSS (VmHWM), so the memory
figure is the worker's, Django and all. Prints a table and the throughput ratio
(service / plain; target >= 1.0) and peak memory (target < 300 MB), and writes the table into
docs/benchmarks.md under "## R2 upload" (only that section is replaced).

    .venv/bin/python bench/r2_upload_bench.py --size-mb 200
    .venv/bin/python bench/r2_upload_bench.py            # 2 GB (moto keeps it in RAM: ~2-4 GB)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
MOTO = Path(sys.executable).with_name("moto_server")
MIB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system) of a process so far: ours, or another's from /proc."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_model(folder: Path, size_mb: int, shards: int) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": 4096}')
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {f"t{i}": i for i in range(5000)}}}))
    (folder / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    per_shard = size_mb * MIB // shards
    block = os.urandom(16 * MIB)  # random bytes so nothing along the way can compress them
    for i in range(shards):
        with (folder / f"model-{i + 1:05d}-of-{shards:05d}.safetensors").open("wb") as fh:
            left = per_shard
            while left > 0:
                chunk = block[: min(left, len(block))]
                fh.write(chunk)
                left -= len(chunk)
            fh.write(i.to_bytes(8, "little"))  # shards differ
    return sum(p.stat().st_size for p in folder.iterdir())


# --- children -------------------------------------------------------------------------------------
def child_service(folder: Path, bucket: str, prefix: str) -> dict:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "crosslogic.settings")
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from apps.catalog import transfer

    files = transfer.select_files(transfer.scan_folder(folder))
    started, cpu = time.perf_counter(), cpu_seconds()
    entries = transfer.transfer_folder(files=files, bucket=bucket, prefix=prefix, progress=transfer.NullProgress())
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    return {"seconds": seconds, "cpu_s": cpu, "bytes": sum(e["size"] for e in entries), "files": len(entries)}


def child_plain(folder: Path, bucket: str, prefix: str) -> dict:
    import boto3
    from botocore.config import Config

    config = Config(request_checksum_calculation="when_required", response_checksum_validation="when_required")
    client = boto3.client(
        "s3",
        endpoint_url=os.environ["R2_ENDPOINT_URL"],
        region_name="auto",
        aws_access_key_id=os.environ["R2_ACCESS_KEY_ID"],
        aws_secret_access_key=os.environ["R2_SECRET_ACCESS_KEY"],
        verify=os.environ["R2_CA_BUNDLE"],
        config=config,
    )
    files = sorted(p for p in folder.iterdir() if p.is_file())
    started, cpu = time.perf_counter(), cpu_seconds()
    for path in files:
        client.upload_file(str(path), bucket, f"{prefix}/{path.name}")
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    return {"seconds": seconds, "cpu_s": cpu, "bytes": sum(p.stat().st_size for p in files), "files": len(files)}


def run_child(kind: str, folder: Path, bucket: str, prefix: str, env: dict) -> dict:
    out = subprocess.run(
        [PYTHON, __file__, "--child", kind, "--folder", str(folder), "--bucket", bucket, "--prefix", prefix],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if out.returncode != 0:
        raise SystemExit(f"{kind} child failed:\n{out.stdout}\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- parent ---------------------------------------------------------------------------------------
def s3_admin(endpoint: str):
    import boto3

    return boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bench", aws_secret_access_key="bench"
    )


def empty_bucket(client, bucket: str) -> None:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            client.delete_object(Bucket=bucket, Key=item["Key"])


def write_docs(path: Path, table: str) -> None:
    heading = "## R2 upload"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(heading)
    if start == -1:
        text = text.rstrip("\n") + "\n\n" + table + "\n"
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + table + ("\n" + text[end + 1 :] if end != -1 else "\n")
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=2048)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1, help="Alternating rounds (plain, service) per run.")
    parser.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"))
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument("--child", choices=["service", "plain"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--bucket", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        fn = child_service if args.child == "service" else child_plain
        result = fn(Path(args.folder), args.bucket, args.prefix)
        result["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(result))
        return

    sys.path.insert(0, str(ROOT))
    from apps.catalog.tests.r2_front import R2Front

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    work = Path(tempfile.mkdtemp(prefix="r2-bench-"))
    moto_log = (work / "moto.log").open("w")
    moto = subprocess.Popen([str(MOTO), "-H", "127.0.0.1", "-p", str(port)], stdout=moto_log, stderr=moto_log)
    front: R2Front | None = None
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or moto.poll() is not None:
                    raise SystemExit("moto_server did not start") from None
                time.sleep(0.2)
        admin = s3_admin(endpoint)  # straight to moto: setup and cleanup are not measured
        admin.create_bucket(Bucket="bench")
        front = R2Front(upstream=endpoint, workdir=work).__enter__()
        print(f"writing a {args.size_mb} MB synthetic model ({args.shards} shards) …", flush=True)
        total = make_model(work / "model", args.size_mb, args.shards)
        os.sync()  # else the model's dirty pages are written back during the first round only
        env = {
            **os.environ,
            "R2_ENDPOINT_URL": front.url,
            "R2_CA_BUNDLE": str(front.ca_file),
            "R2_ACCESS_KEY_ID": "bench",
            "R2_SECRET_ACCESS_KEY": "bench",
            "R2_BUCKET": "bench",
            "R2_REGION": "auto",
            "DJANGO_SETTINGS_MODULE": "crosslogic.settings",
            "LOG_LEVEL": "WARNING",
        }
        results: dict[str, list[dict]] = {"plain": [], "service": []}
        for round_no in range(args.rounds):
            # The order alternates so that neither path always runs on a warmer (or busier) machine.
            for kind in ("plain", "service") if round_no % 2 == 0 else ("service", "plain"):
                store_cpu = cpu_seconds(moto.pid)
                result = run_child(kind, work / "model", "bench", f"models/{kind}-{round_no}", env)
                result["store_cpu_s"] = cpu_seconds(moto.pid) - store_cpu
                results[kind].append(result)
                print(
                    f"round {round_no + 1} {kind:<8} {result['seconds']:.2f}s "
                    f"{result['bytes'] / MIB / result['seconds']:.0f} MiB/s peak {result['peak_rss_mb']:.0f} MB, "
                    f"CPU uploader {result['cpu_s']:.1f}s store {result['store_cpu_s']:.1f}s",
                    flush=True,
                )
                empty_bucket(admin, "bench")  # moto keeps objects in RAM
                # moto spools large objects to temporary files: flush their pages now, or the next
                # upload pays for this one's writeback.
                os.sync()
        if front.refusals:
            raise SystemExit(f"the R2 front refused requests: {dict(front.refusals)}")
        print("R2 front: no request refused", flush=True)
    finally:
        if front is not None:
            front.__exit__(None, None, None)
        moto.terminate()
        moto.wait(timeout=20)
        moto_log.close()
        shutil.rmtree(work, ignore_errors=True)

    def throughput(kind: str) -> float:
        runs = results[kind]
        return sum(r["bytes"] for r in runs) / MIB / sum(r["seconds"] for r in runs)

    ratio = throughput("service") / throughput("plain")
    per_round = ", ".join(
        f"{p['seconds'] / s['seconds']:.2f}" for p, s in zip(results["plain"], results["service"], strict=True)
    )
    peak = max(r["peak_rss_mb"] for r in results["service"])
    rows = [
        "| path | MiB/s | seconds (mean) | uploader CPU s (mean) | store CPU s (mean) | worker peak RSS |",
        "|---|---|---|---|---|---|",
    ]
    for kind, label in (
        ("plain", "plain boto3 `upload_file`, default TransferConfig"),
        ("service", "CrossLogic upload service (sha256 + HEAD + multipart + manifest)"),
    ):
        runs = results[kind]
        mean = {k: sum(r[k] for r in runs) / len(runs) for k in ("seconds", "cpu_s", "store_cpu_s")}
        rows.append(
            f"| {label} | {throughput(kind):.0f} | {mean['seconds']:.2f} | {mean['cpu_s']:.1f} "
            f"| {mean['store_cpu_s']:.1f} | {max(r['peak_rss_mb'] for r in runs):.0f} MB |"
        )
    table = "\n".join(
        [
            "## R2 upload",
            "",
            f"`bench/r2_upload_bench.py --size-mb {args.size_mb} --shards {args.shards} --rounds {args.rounds}` "
            f"on {platform.machine()} / Python {platform.python_version()}, {os.cpu_count()} cores, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Model: {total / MIB:.0f} MiB; "
            "store: moto_server on "
            "localhost behind the R2 front (https, R2's refusals; in-memory, CPU-bound, shares the cores with the "
            "uploader).",
            "",
            *rows,
            "",
            f"- throughput ratio service / plain: **{ratio:.3f}** (target >= 1.0; per round: {per_round})",
            f"- upload worker peak memory: **{peak:.0f} MB** (target < 300 MB, whatever the model size)",
            "",
            "The service also hashes every file (sha256, computed ahead while earlier files upload) and HEADs "
            "each object to skip what is already there, and sends up to UPLOAD_FILES_IN_FLIGHT files at once "
            "(their parts share R2_MAX_CONCURRENCY threads); plain boto3 sends one file after the other.",
            "",
            "How to read it: the store is a Python server on the same two cores, so both paths are bound by "
            "its CPU (the store CPU column), and the uploader's own CPU competes with it. The service spends "
            "more CPU than plain boto3 (the uploader column) on the one thing plain boto3 does not do: a "
            "sha256 of every byte before it is sent, which the object metadata and the resume check need. "
            "Per-round ratios vary by about ±5% (rounds alternate which path goes first), so a ratio near "
            "1.0 means parity with plain boto3 on this machine, not a lead; against R2 over a network the "
            "store's CPU is not the limit. Parts of 8 MiB (R2_MULTIPART_CHUNK_MB) cost this store less "
            "than 16 MiB parts did (0.94 at 16 MiB in an earlier run of this benchmark).",
        ]
    )
    print()
    print(table)
    if not args.no_docs:
        write_docs(Path(args.docs), table)
        print(f"\n(written to {args.docs})")


if __name__ == "__main__":
    main()

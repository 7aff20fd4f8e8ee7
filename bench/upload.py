"""A large dataset upload through `tessera serve`: throughput, and how much the web process grows.

    python -m bench.upload                     # 1 GiB, multipart and resumable (tus), port 18250
    python -m bench.upload --size-mib 256 --port 18251 --name upload_quick

A fresh `tessera serve` runs in a temporary data folder. The upload is sent from this process as
a stream (never built in memory here either): once as one multipart POST to /api/v1/datasets,
once as tus PATCHes of 16 MiB to /api/v1/datasets/uploads. The web process's RSS (uvicorn, found
among serve's children) is sampled every 50 ms. The bytes are random, so validation refuses the
upload at once ("unsupported_upload") and the dataset is deleted afterwards; only the transfer
is measured. Writes bench/results/<name>.json.
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from bench.common import machine, print_table, write_json

BLOCK = 1 << 20
TUS_CHUNK = 16 << 20
REPO_ROOT = Path(__file__).resolve().parents[1]


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _web_pid(serve_pid: int) -> int:
    for pid in _children(serve_pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"uvicorn" in cmdline:
            return pid
    raise RuntimeError("no uvicorn child found")


class Sampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, _rss(self.pid))
            time.sleep(0.05)


def _random_blocks(total: int) -> Iterator[bytes]:
    block = os.urandom(BLOCK)  # one random block, varied cheaply: the content does not matter
    sent = 0
    counter = 0
    while sent < total:
        size = min(BLOCK, total - sent)
        counter += 1
        yield counter.to_bytes(8, "little") + block[8:size] if size > 8 else block[:size]
        sent += size


def _multipart(total: int, boundary: str) -> Iterator[bytes]:
    yield (
        f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\nbench\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="bench.bin"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    yield from _random_blocks(total)
    yield f"\r\n--{boundary}--\r\n".encode()


def _measure(web_pid: int, send) -> dict[str, Any]:
    before = _rss(web_pid)
    sampler = Sampler(web_pid)
    sampler.start()
    start = time.perf_counter()
    dataset_id = send()
    seconds = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    return {"dataset_id": dataset_id, "seconds": seconds, "rss_before": before, "rss_peak": sampler.peak}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--port", type=int, default=18250)
    parser.add_argument("--name", default="upload")
    args = parser.parse_args()
    total = args.size_mib * BLOCK
    work = Path(tempfile.mkdtemp(prefix="tessera-bench-upload-"))
    env = dict(os.environ)
    env.update(
        TESSERA_DATA_DIR=str(work / "data"),
        TESSERA_PORT=str(args.port),
        TESSERA_HOST="127.0.0.1",
        TESSERA_ADMIN_USERNAME="admin",
        TESSERA_ADMIN_PASSWORD="bench-password-123",
        TESSERA_DEMO_DATASET_ON_SERVE="false",
        TESSERA_LOG_LEVEL="WARNING",
        PYTHONUNBUFFERED="1",
    )
    log = (work / "serve.log").open("wb")
    serve = subprocess.Popen(
        [sys.executable, "-c", "from backend.cli import app; app()", "serve"],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{args.port}"
    rows = []
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or serve.poll() is not None:
                raise RuntimeError((work / "serve.log").read_text())
            time.sleep(0.5)
        web = _web_pid(serve.pid)
        client = httpx.Client(base_url=url, timeout=600)
        token = client.post(
            "/api/v1/auth/token", data={"username": "admin", "password": "bench-password-123"}
        ).json()["access_token"]
        auth = {"Authorization": f"Bearer {token}"}

        def multipart() -> int:
            boundary = "tessera-bench-boundary"
            response = client.post(
                "/api/v1/datasets",
                content=_multipart(total, boundary),
                headers={**auth, "Content-Type": f"multipart/form-data; boundary={boundary}"},
            )
            response.raise_for_status()
            return response.json()["id"]

        def tus() -> int:
            meta = (
                "name "
                + base64.b64encode(b"bench").decode()
                + ",filename "
                + base64.b64encode(b"b.bin").decode()
            )
            created = client.post(
                "/api/v1/datasets/uploads",
                headers={
                    **auth,
                    "Tus-Resumable": "1.0.0",
                    "Upload-Length": str(total),
                    "Upload-Metadata": meta,
                },
            )
            created.raise_for_status()
            location = created.headers["Location"]
            offset = 0
            blocks = _random_blocks(total)
            while offset < total:
                size = min(TUS_CHUNK, total - offset)

                def chunk(size: int = size) -> Iterator[bytes]:
                    left = size
                    while left > 0:
                        block = next(blocks)
                        yield block
                        left -= len(block)

                response = client.patch(
                    location,
                    content=chunk(),
                    headers={
                        **auth,
                        "Tus-Resumable": "1.0.0",
                        "Upload-Offset": str(offset),
                        "Content-Type": "application/offset+octet-stream",
                        "Content-Length": str(size),
                    },
                )
                response.raise_for_status()
                offset = int(response.headers["Upload-Offset"])
            return int(location.rsplit("/", 1)[1])

        for label, send in (("multipart POST", multipart), ("tus PATCH 16 MiB", tus)):
            result = _measure(web, send)
            stored = work / "data" / "datasets" / str(result["dataset_id"]) / "upload"
            size_ok = stored.exists() and stored.stat().st_size == total
            client.delete(f"/api/v1/datasets/{result['dataset_id']}", headers=auth)
            rows.append(
                {
                    "method": label,
                    "size_mib": args.size_mib,
                    "seconds": round(result["seconds"], 2),
                    "mib_per_s": round(args.size_mib / result["seconds"], 1),
                    "web_rss_before_mib": round(result["rss_before"] / BLOCK, 1),
                    "web_rss_peak_mib": round(result["rss_peak"] / BLOCK, 1),
                    "web_rss_growth_mib": round((result["rss_peak"] - result["rss_before"]) / BLOCK, 1),
                    "stored_size_matches": size_ok,
                }
            )
            time.sleep(1)
    finally:
        serve.send_signal(signal.SIGINT)
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()
        log.close()
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows, list(rows[0]))
    path = write_json(
        args.name,
        {
            "machine": machine("cpu"),
            "note": "client and server on the same machine (loopback), shared CPU: noisy",
            "results": rows,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

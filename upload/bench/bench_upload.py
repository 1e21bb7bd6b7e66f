#!/usr/bin/env python3
"""Throughput and memory of the upload component's HTTP side, beside nginx as the floor.

Runs `upload` (release build) without a router: the HTTP side needs only the secret, so
this script signs slot URLs itself (the same HMAC scheme as upload/src/sign.rs, which
also checks that scheme from the outside). Measures with curl, on loopback:

- PUT and GET of one SIZE MB file, plain HTTP and HTTPS, median of RUNS runs, beside
  nginx (PUT with its WebDAV module, GET as a static file) with the same certificate;
- the peak resident memory (VmHWM) of a fresh `upload` process while N uploads of
  M MB run at once, for two values of M (it must not grow with the file size).

    cargo build --release -p upload
    python3 upload/bench/bench_upload.py [--size 100] [--runs 3] [--concurrent 50]

nginx is optional (`apt-get install nginx`); without it that column is left out.
"""

import argparse
import base64
import hashlib
import hmac
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[2]
SECRET = b"benchmark-secret-0123456789"
CT = "application/octet-stream"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def mac(parts):
    m = hmac.new(SECRET, digestmod=hashlib.sha256)
    for p in parts:
        m.update(len(p).to_bytes(8, "big"))
        m.update(p)
    return m.digest()


def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def slot_urls(base, name, size):
    slot = b64(os.urandom(16))
    tag = b64(mac([b"get", slot.encode(), name.encode()])[:16])
    expires = int(time.time()) + 3600
    sig = b64(mac([b"put", slot.encode(), name.encode(), str(size).encode(), CT.encode(),
                   str(expires).encode()]))
    get = f"{base}/{slot}/{tag}/{quote(name, safe='-._~')}"
    put = f"{get}?size={size}&type={quote(CT, safe='')}&expires={expires}&sig={sig}"
    return put, get


def curl(args):
    out = subprocess.run(["curl", "-sS", "-k", "-o", "/dev/null",
                          "-w", "%{http_code} %{time_total}", *args],
                         check=True, capture_output=True, text=True).stdout.split()
    return int(out[0]), float(out[1])


def start_upload(tmp, name, port, tls, binary):
    d = tmp / name
    d.mkdir()
    scheme = "https" if tls else "http"
    tls_attrs = (f"tls='true' cert='{tmp}/cert.pem' key='{tmp}/key.pem' self-signed='true'"
                 if tls else "")
    (d / "upload.xml").write_text(
        "<upload>\n"
        "  <router address='127.0.0.1' port='1' name='upload.localhost' secret='x'/>\n"
        "  <host>localhost</host>\n"
        f"  <http address='127.0.0.1' port='{port}' {tls_attrs} "
        f"base-url='{scheme}://localhost:{port}' timeout='60'/>\n"
        f"  <secret>{SECRET.decode()}</secret>\n"
        f"  <spool dir='{d}/spool'/>\n"
        "  <files max-size='10G' disk-budget='0'/><quota bytes='0'/>\n"
        "  <log level='error'/>\n"
        "</upload>\n")
    proc = subprocess.Popen([binary, "-c", str(d / "upload.xml")], cwd=d,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_listening(port)
    return proc, f"{scheme}://localhost:{port}"


def start_nginx(tmp, http_port, https_port):
    if shutil.which("nginx") is None:
        return None
    d = tmp / "nginx"
    (d / "www").mkdir(parents=True)
    conf = d / "nginx.conf"
    # Workers run as another user when started as root: let them write here.
    user = "user root;" if os.geteuid() == 0 else ""
    conf.write_text(f"""
{user}
daemon off;
worker_processes 2;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    sendfile on;
    client_max_body_size 0;
    server {{
        listen 127.0.0.1:{http_port};
        listen 127.0.0.1:{https_port} ssl;
        ssl_certificate {tmp}/cert.pem;
        ssl_certificate_key {tmp}/key.pem;
        root {d}/www;
        location / {{ dav_methods PUT; }}
    }}
}}
""")
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(d)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_listening(http_port)
    wait_listening(https_port)
    return proc


def throughput(put_get, file, size, runs):
    """Median seconds of PUT and of GET over `runs` fresh slots."""
    puts, gets = [], []
    for _ in range(runs):
        put, get = put_get()
        code, t = curl(["-T", str(file), "-H", f"Content-Type: {CT}", put])
        assert code in (201, 204), f"PUT answered {code}"
        puts.append(t)
        code, t = curl([get])
        assert code == 200, f"GET answered {code}"
        gets.append(t)
    return size / statistics.median(puts), size / statistics.median(gets)


def peak_memory(tmp, binary, n, mb, tls):
    """VmHWM (KiB) of a fresh upload process after n concurrent PUTs of mb MB each."""
    port = free_port()
    proc, base = start_upload(tmp, f"mem-{n}-{mb}-{tls}", port, tls, binary)
    try:
        file = tmp / f"mem-{mb}.bin"
        if not file.exists():
            with open(file, "wb") as f:
                for _ in range(mb):
                    f.write(os.urandom(1 << 20))
        urls = [slot_urls(base, f"f{i}.bin", mb << 20)[0] for i in range(n)]
        codes = []
        threads = [threading.Thread(target=lambda u=u: codes.append(
            curl(["-T", str(file), "-H", f"Content-Type: {CT}", u])[0])) for u in urls]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert codes == [201] * n, codes
        status = Path(f"/proc/{proc.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines()
                        if line.startswith("VmHWM:")))
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(tmp / f"mem-{n}-{mb}-{tls}", ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=str(ROOT / "target" / "release" / "upload"))
    ap.add_argument("--size", type=int, default=100, help="MB of the throughput file")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--concurrent", type=int, default=50)
    ap.add_argument("--mem-sizes", default="20,80", help="MB per concurrent upload")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="upload-bench-") as t:
        tmp = Path(t)
        file = tmp / "file.bin"
        with open(file, "wb") as f:
            for _ in range(args.size):
                f.write(os.urandom(1 << 20))
        size_mb = args.size * (1 << 20) / 1e6
        plain_port, tls_port = free_port(), free_port()
        plain, plain_base = start_upload(tmp, "plain", plain_port, False, args.bin)
        tls, tls_base = start_upload(tmp, "tls", tls_port, True, args.bin)
        ng_http, ng_https = free_port(), free_port()
        nginx = start_nginx(tmp, ng_http, ng_https)
        rows = []
        try:
            for label, base in (("upload, HTTP", plain_base), ("upload, HTTPS", tls_base)):
                up, down = throughput(lambda b=base: slot_urls(b, "file.bin", args.size << 20),
                                      file, size_mb, args.runs)
                rows.append((label, up, down))
            if nginx is not None:
                for label, base in (("nginx, HTTP", f"http://localhost:{ng_http}"),
                                    ("nginx, HTTPS", f"https://localhost:{ng_https}")):
                    def urls(b=base):
                        name = b64(os.urandom(9))
                        return f"{b}/{name}", f"{b}/{name}"
                    up, down = throughput(urls, file, size_mb, args.runs)
                    rows.append((label, up, down))
        finally:
            for p in (plain, tls, nginx):
                if p is not None:
                    p.terminate()
                    p.wait()
        print(f"{args.size} MiB file, curl on loopback, median of {args.runs} runs (MB/s)")
        print("| server | PUT MB/s | GET MB/s |")
        print("|---|---|---|")
        for label, up, down in rows:
            print(f"| {label} | {up:.0f} | {down:.0f} |")
        print()
        print(f"peak RSS of upload with {args.concurrent} concurrent PUTs")
        print("| each file | HTTP VmHWM | HTTPS VmHWM |")
        print("|---|---|---|")
        for mb in (int(m) for m in args.mem_sizes.split(",")):
            plain_kib = peak_memory(tmp, args.bin, args.concurrent, mb, False)
            tls_kib = peak_memory(tmp, args.bin, args.concurrent, mb, True)
            print(f"| {mb} MiB | {plain_kib / 1024:.1f} MiB | {tls_kib / 1024:.1f} MiB |")


if __name__ == "__main__":
    main()

"""Training input at cluster scale: memory, time to the first step, bytes read, shuffled reads.

For synthetic prepared sets of each ``--sizes`` (default 2,000 and 20,000 images at
``--image-size`` 64: a small side keeps preparing 20,000 images to a minute; what is measured
scales with the image count, not the side), run as a cluster user would:

- an S3-compatible bucket (``moto_server`` on 127.0.0.1) behind a byte-counting proxy, holding
  the prepared set (``data.out_dir``: a bucket URI; the set is prepared once in ``--work`` and
  uploaded as ``frcnn prepare`` would write it there) and the runs (``train.storage_path``);
- a Ray cluster of two nodes on loopback (the head, where the driver runs, and ``node_b``); the
  two training workers are placed on ``node_b`` (``train.worker_resources``), so they read the
  set from the bucket, as on a second machine;
- ``frcnn train --stage rpn``, one epoch of batch ``--batch-size`` per worker (the whole set:
  the bytes read are an epoch's, not a prefetch's).

Measured per set (a JSON list, ``--out FILE``, one object per set):

- ``peak_worker_rss_mib``: the largest peak resident memory (VmHWM) of a training worker;
- ``peak_driver_rss_mib``: of the ``frcnn train`` process;
- ``first_step_seconds``: from the command's start to rank 0's first step line;
- ``bytes_read_per_image``: bytes the bucket served during the run per image the workers
  trained on, next to ``stored_bytes_per_image`` (the prepared table's size per image);
- ``shuffled_images_per_s_per_core`` / ``sequential_images_per_s_per_core``: what one Ray
  Train worker on ``node_b`` is handed per second over one epoch by the training input
  (:class:`pipeline.training.ray_input.ShardInput`: Ray Data read and split, decoding and
  flipping in one thread), with ``train.shuffle_buffer``'s local shuffle and without;
- ``plain_*``: the same for the plain reader (:class:`pipeline.training.loader.
  DetectionDataset`, the one-process loop's), one thread, over ``--reader-images`` images in
  the sampler's shuffled order and in table order, and the image bytes it read per image in
  shuffled order (random access: a row group per image).

Usage::

    python benchmarks/bench_ingest.py --sizes 2000,20000 --out /tmp/ingest.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import http.server
import json
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pyarrow.parquet as pq
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import Config  # noqa: E402
from pipeline.prepare.stage import prepare_dataset  # noqa: E402
from pipeline.prepared_table import CLASSES_FILE, PreparedTable, split_path  # noqa: E402
from pipeline.storage import upload_folder  # noqa: E402
from pipeline.training.loader import DetectionDataset, ResumableSampler  # noqa: E402
from tests.support.procs import free_ports, subprocess_env  # noqa: E402
from tests.support.ray_cluster import ray_cluster  # noqa: E402
from tests.support.servers import moto_server  # noqa: E402

BUCKET = "frcnn-ingest"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="2000,20000", help="images per prepared set")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32, help="images per worker per step")
    p.add_argument("--reader-images", type=int, default=400)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--work", type=Path, default=None,
                   help="work folder (kept; prepared sets found there are reused)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------
# A byte-counting proxy in front of the bucket


class CountingProxy:
    """Forwards HTTP to ``target`` (host, port) and counts the bytes of response bodies
    of GETs outside checkpoint folders (``served``: training input) and of request bodies
    (``received``)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.served = 0
        self.received = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _body(self) -> bytes | None:
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    parts = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(parts)
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else None

            def _forward(self) -> None:
                body = self._body()
                length = len(body or b"")
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("transfer-encoding", "expect", "content-length")}
                if body is not None:
                    headers["Content-Length"] = str(length)
                conn = http.client.HTTPConnection(*proxy.target, timeout=300)
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                with proxy._lock:
                    proxy.received += length
                self.send_response(response.status, response.reason)
                head = self.command == "HEAD"  # its Content-Length is the object's size
                for key, value in response.getheaders():
                    if key.lower() in ("transfer-encoding", "connection") or \
                            (key.lower() == "content-length" and not head):
                        continue
                    self.send_header(key, value)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                    # reads of training input, not of checkpoints (the driver fetches the last
                    # one for the model file); counted once delivered
                    if self.command == "GET" and "checkpoint" not in self.path:
                        with proxy._lock:
                            proxy.served += len(data)
                conn.close()

            def handle_one_request(self) -> None:
                try:
                    super().handle_one_request()
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client hung up (a cancelled read)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        (port,) = free_ports(1)
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.endpoint = f"http://127.0.0.1:{port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def reset(self) -> None:
        with self._lock:
            self.served = self.received = 0

    def close(self) -> None:
        self.server.shutdown()


# --------------------------------------------------------------------------------------------
# Measurements


def vm_hwm_mib(pid: int) -> float:
    """Peak resident memory of ``pid`` so far (VmHWM), MiB; 0 when it is gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def reader_rates(path: Path, images: int) -> dict[str, float]:
    """Images/s of the plain reader (read + decode + flip), one thread, table order vs the
    sampler's shuffled order, and the image bytes read per image in shuffled order."""
    dataset = DetectionDataset(path, hflip=0.5, seed=0)
    column = dataset.table.schema_arrow.names.index("image")
    sizes = [meta.row_group(g).column(column).total_compressed_size
             for meta in map(pq.read_metadata, dataset.table.files)
             for g in range(meta.num_row_groups)]
    starts = dataset.row_group_starts
    orders = {"sequential": list(range(min(images, len(dataset)))),
              "shuffled": list(ResumableSampler(len(dataset), seed=0))[:images]}
    # keys: plain_<order>_images_per_s_per_core
    out: dict[str, float] = {}
    for i in orders["sequential"][:32]:  # warm-up: imports, the decoder, the page cache
        dataset[i]
    for name, order in orders.items():
        groups_read = 0
        last = None
        start = time.perf_counter()
        for i in order:
            group = _group_of(starts, i)
            groups_read += group != last  # the dataset keeps the last row group only
            last = group
            dataset[i]
        out[f"plain_{name}_images_per_s_per_core"] = len(order) / (time.perf_counter() - start)
        if name == "shuffled":
            out["plain_bytes_per_image_shuffled"] = groups_read * (sum(sizes) / len(sizes)) \
                / len(order)
    return out


def ray_data_rates(cluster: Any, path: Path, rows: int, image_size: int) -> dict[str, float]:
    """Images/s one Ray Train worker on ``node_b`` is handed by :class:`pipeline.training.
    ray_input.ShardInput` over Ray Data (read, split, shuffle buffer, decode and flip in one
    thread: a core), one epoch, with the shuffle buffer of ``params.yaml`` and with none."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.ray_session import LOCAL_RAY_ENV
    from pipeline.training.ray_input import ShardInput, data_config, epoch_datasets

    def walk(config: dict) -> None:

        data = ShardInput(rows=config["rows"], world_size=1, rank=0,
                          image_size=config["image_size"], batch_size=32, seed=0, hflip=0.5,
                          use_difficult=False, shuffle_buffer=config["buffer"], threads=1)
        images, start = 0, None
        for batch in data.epoch(0):
            start = start or time.perf_counter()
            images += len(batch["image_ids"])
        Path(config["out"]).write_text(json.dumps(  # same machine: a file is the simplest way
            {"images": images, "seconds": time.perf_counter() - start}))

    for name, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(name, value)
    out = {}
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    try:
        for key, buffer in (("shuffled", Config().train.shuffle_buffer), ("sequential", 0)):
            figures = path.parent / f"walk-{key}.json"
            TorchTrainer(
                walk, train_loop_config={"rows": rows, "image_size": image_size,
                                         "buffer": buffer, "out": str(figures)},
                datasets=epoch_datasets([str(path)], rows=rows, epochs=1, seed=0,
                                        world_size=1),
                dataset_config=data_config(),
                scaling_config=ScalingConfig(num_workers=1, resources_per_worker={
                    "CPU": 0.5, "ingest_worker": 1}),
                run_config=RunConfig(storage_path=str(path.parent / f"walk-{key}"))).fit()
            walked = json.loads(figures.read_text())
            out[f"{key}_images_per_s_per_core"] = walked["images"] / walked["seconds"]
            out[f"{key}_images"] = walked["images"]
    finally:
        ray.shutdown()
    return out


def _group_of(starts: list[int], index: int) -> int:
    import bisect
    return bisect.bisect_right(starts, index) - 1


@contextlib.contextmanager
def cluster_with_bucket(folder: Path) -> Iterator[tuple[Any, CountingProxy, dict[str, str]]]:
    # the cluster's token in this process's environment before Ray reads it (ray_data_rates
    # joins in-process, as a user's driver does)
    token = secrets.token_hex(32)
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    with moto_server(folder / "moto", bucket=BUCKET) as s3:
        proxy = CountingProxy(("127.0.0.1", int(s3.endpoint.rsplit(":", 1)[1])))
        env = {**s3.env(), "AWS_ENDPOINT_URL": proxy.endpoint,
               "MLFLOW_S3_ENDPOINT_URL": proxy.endpoint}
        try:
            with ray_cluster(folder / "ray", head_cpus=1, head_resources={}, env=env,
                             token=token) as cluster:
                cluster.add_node("node_b", cpus=1, resources={"ingest_worker": 2}, env=env)
                cluster.wait_for_nodes(2)
                yield cluster, proxy, env
        finally:
            proxy.close()


def train_once(project: Path, prepared: str, image_size: int, n: int, *, batch_size: int,
               cluster: Any, proxy: CountingProxy, env: dict[str, str]) -> dict[str, float]:
    """One ``frcnn train --stage rpn`` on the cluster of the set at URI ``prepared``; memory,
    first step, bytes served."""
    params = {
        "data": {"out_dir": prepared, "image_size": image_size},
        "anchors": {"scales": [1, 2, 4]},
        "rpn": {"min_size": 4.0},
        "train": {"num_workers": 2, "cpus_per_worker": 0.5, "batch_size": batch_size,
                  "loader_workers": 1, "use_gpu": "false",
                  "rpn_epochs": 1, "log_every": 1, "checkpoint_every": 0,
                  "worker_resources": {"ingest_worker": 1}, "ray_address": cluster.address,
                  "storage_path": f"s3://{BUCKET}/runs-{n}",
                  "rpn_model": str(project / f"rpn-{n}.pt"),
                  "metrics_dir": str(project / f"metrics-{n}")},
        "tracking": {"uri": f"sqlite:///{project}/mlflow.db", "system_metrics": False},
        "backbone": {"weights": "none"},
    }
    params_file = project / f"params-{n}.yaml"
    params_file.write_text(yaml.safe_dump(params))
    proxy.reset()
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "train", "--stage", "rpn",
                             "--params", str(params_file)], cwd=project,
                            env=subprocess_env(**env, **cluster.env()), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    first_step: list[float] = []
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if not first_step and " step 1/" in line:
                first_step.append(time.perf_counter() - start)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    driver_peak = worker_peak = 0.0
    while proc.poll() is None:
        driver_peak = max(driver_peak, vm_hwm_mib(proc.pid))
        for pid in cluster.processes("node_b", "RayTrainWorker"):
            worker_peak = max(worker_peak, vm_hwm_mib(pid))
        time.sleep(0.2)
    reader.join(10)
    if proc.returncode != 0 or not first_step:
        raise RuntimeError(f"frcnn train failed ({proc.returncode}):\n{''.join(lines)[-4000:]}")
    delivered = n  # one epoch
    return {"peak_worker_rss_mib": worker_peak, "peak_driver_rss_mib": driver_peak,
            "first_step_seconds": first_step[0], "bytes_read_per_image": proxy.served / delivered,
            "wall_seconds": time.perf_counter() - start}


def prepared_size(prepared: Path) -> int:
    return int(json.loads((prepared / "classes.json").read_text())["image_size"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"# bench_ingest: {datetime.date.today()}, {platform.processor() or platform.machine()}"
          f", {os.cpu_count()} cores, torch {torch.__version__}, sets of {sizes} images at "
          f"{args.image_size} px, one epoch of batch {args.batch_size} on 2 workers", flush=True)
    print(f"# command: python benchmarks/bench_ingest.py {' '.join(sys.argv[1:])}", flush=True)
    rows = []
    with (contextlib.nullcontext(str(args.work)) if args.work
          else tempfile.TemporaryDirectory(prefix="bench-ingest-")) as tmp:
        project = Path(tmp)
        project.mkdir(parents=True, exist_ok=True)
        with cluster_with_bucket(project / "servers") as (cluster, proxy, env):
            for n in sizes:
                prepared = project / f"prepared-{n}"
                cfg = Config().replace({
                    "data.synthetic_images": n, "data.image_size": args.image_size,
                    "data.val_fraction": 0.0, "data.test_fraction": 0.0,
                    "data.num_workers": 2, "data.out_dir": str(prepared)})
                t0 = time.perf_counter()
                if not (prepared / "classes.json").is_file():
                    prepare_dataset(cfg, progress=False)
                path = split_path(prepared, "train")
                row: dict[str, float] = {"images": n,
                                         "stored_bytes_per_image": PreparedTable(path).num_bytes / n,
                                         "prepare_seconds": time.perf_counter() - t0}
                # as a cluster user's set: in the bucket (as `frcnn prepare` with a bucket
                # URI as data.out_dir writes it), read there by the driver and the workers
                os.environ.update(env)
                uri = f"s3://{BUCKET}/prepared-{n}"
                upload_folder(prepared, uri, last=CLASSES_FILE)
                row.update(train_once(project, uri, prepared_size(prepared), n,
                                      batch_size=args.batch_size, cluster=cluster,
                                      proxy=proxy, env=env))
                print(json.dumps(row), flush=True)  # the run's figures, whatever comes next
                row.update(ray_data_rates(cluster, path, n, args.image_size))
                row.update(reader_rates(path, args.reader_images))
                rows.append(row)
                print(json.dumps(row), flush=True)
    text = json.dumps(rows, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Planted secrets, and the search of a whole MLflow store for them (the security tests).

:data:`SECRETS` go into the environment of a run (the tracking server's password among them),
:data:`URI_SECRETS` into URIs the config must refuse (a tracking server's password, bucket
keys); :func:`secret_hits` lists every place in the store that still holds one: parameters,
tags, metric names, every artifact (downloaded through the store), and the raw bytes of files
(the database, the artifact folder); :func:`bucket_secret_hits` every object of a bucket.
"""

from __future__ import annotations

from pathlib import Path

from tests.support import mlflow_store

SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-pass-0123456789",
    "MLFLOW_TRACKING_TOKEN": "mlflow-token-abcdef0123",
    "GITHUB_TOKEN": "ghp_0123456789abcdefABCDEF",
    "MY_SERVICE_API_KEY": "sk-live-9876543210zyxw",
}
URI_SECRETS = ("uri-pass-246813579", "s3-secret-1357924680")


def secret_hits(store: str, *, raw_files: list[Path], download_to: Path) -> list[str]:
    """Every place in the store that holds a planted secret: params, tags, metric names,
    artifacts (downloaded through the store), and the raw bytes of ``raw_files`` (the database,
    the artifact folder)."""
    secrets = (*SECRETS.values(), *URI_SECRETS)
    client = mlflow_store.client(store)
    hits = []
    for run in mlflow_store.runs(store):
        texts = {"params": [f"{k}={v}" for k, v in run.data.params.items()],
                 "tags": [f"{k}={v}" for k, v in run.data.tags.items()],
                 "metrics": list(run.data.metrics)}
        folder = Path(client.download_artifacts(run.info.run_id, "",
                                                str(download_to / run.info.run_id)))
        texts["artifacts"] = [p.read_bytes().decode("latin-1") for p in sorted(folder.rglob("*"))
                              if p.is_file()]
        hits += [f"{run.info.run_name} {where}" for where, values in texts.items()
                 for s in secrets for v in values if s in v]
    for path in raw_files:
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            data = file.read_bytes() if file.is_file() else b""
            hits += [f"{file}: bytes" for s in secrets if s.encode() in data]
    return hits


def bucket_secret_hits(endpoint: str, bucket: str, *, secrets: tuple[str, ...] = ()) -> list[str]:
    """Every object of ``bucket`` (checkpoints, Tune's pickled state, staged data, sweep
    outputs) whose bytes hold a planted secret (:data:`SECRETS`, :data:`URI_SECRETS` and
    ``secrets``)."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="x", aws_secret_access_key="x")
    planted = (*SECRETS.values(), *URI_SECRETS, *secrets)
    hits, token = [], None
    while True:
        page = client.list_objects_v2(Bucket=bucket, **({"ContinuationToken": token}
                                                          if token else {}))
        for item in page.get("Contents", []):
            data = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            hits += [f"s3://{bucket}/{item['Key']}" for s in planted if s.encode() in data]
        token = page.get("NextContinuationToken")
        if not token:
            return hits

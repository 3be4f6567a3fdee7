"""``python -m pipeline.tracking uri [--params FILE ...]``: the store ``make ui`` serves."""

from __future__ import annotations

from pathlib import Path

from pipeline.tracking.store import resolve_uri


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.tracking uri [--params FILE ...]``: the store ``make ui`` serves."""
    import argparse

    from pipeline.config import load_config
    parser = argparse.ArgumentParser(prog="python -m pipeline.tracking")
    parser.add_argument("what", choices=["uri"])
    parser.add_argument("--params", action="append", default=None)
    args = parser.parse_args(argv)
    params = args.params or (["params.yaml"] if Path("params.yaml").is_file() else [])
    print(resolve_uri(load_config(params).tracking.uri))
    return 0


raise SystemExit(main())

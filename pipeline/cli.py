"""The ``frcnn`` command: one subcommand per pipeline stage.

Every subcommand reads ``params.yaml`` (``--params PATH``, repeatable, later files win) and
``--set section.key=value`` overrides (repeatable) into one validated :class:`Config` before any
work starts, then calls its stage's entry point, ``pipeline.<stage>.run(cfg, args)``, imported
only when needed (``frcnn --help`` is instant).

Expected failures (:class:`pipeline.errors.PipelineError`: bad parameters, bad or missing data,
an unreachable tracking store, too little memory, a run that failed after its restarts) are
caught here, once: ``frcnn <command>: <message>`` on stderr, exit code 2 for parameters and 1
otherwise. Ctrl-C exits with 130. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Sequence

from pipeline.config import Config, describe, load_config
from pipeline.config.validate import check_no_credentials
from pipeline.errors import ConfigError, PipelineError
from pipeline.redaction import redact

#: The environment's URIs the stages read (checked like the config's: no credentials in them)
URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "RAY_ADDRESS")

#: ``frcnn <command>``: (module whose ``run`` it calls, help, the config sections it reads)
COMMANDS = {
    "prepare": ("pipeline.prepare", "Read a dataset, resize to data.image_size, validate, split, "
                                    "write data/prepared/*.parquet", ("data", "tracking")),
    "train": ("pipeline.training", "Train the RPN (--stage rpn) or the full Faster R-CNN "
                                   "(--stage frcnn) with Ray Train",
              ("data", "backbone", "anchors", "rpn", "roi", "train", "tracking")),
    "evaluate": ("pipeline.evaluation", "Proposal recall (Parquet), detection mAP, plots and "
                                        "pictures",
                 ("data", "backbone", "anchors", "rpn", "roi", "train", "eval", "tracking")),
    "sweep": ("pipeline.sweep", "Ray Tune sweep over anchor and sampling hyperparameters", None),
    "predict": ("pipeline.predict", "Run the detector on image files; print JSON or draw boxes",
                ("data", "train", "eval", "tracking")),
    "anchors": ("pipeline.anchor_coverage", "Anchor coverage: trainable positions per anchor "
                                            "type, anchor-only recall and the stride's ceiling "
                                            "per class (no model needed); --fit: anchor shapes "
                                            "fitted to the train split",
                ("data", "anchors", "rpn", "eval")),
}


def version() -> str:
    """The installed package's version (its metadata: pyproject.toml owns it)."""
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed("frcnn")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown (not installed)"


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", action="append", metavar="PATH", default=None,
                        help="parameter file (default: params.yaml); repeat to overlay files, "
                             "later ones win")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE",
                        help="override one parameter (value parsed as YAML); repeatable")


def build_parser() -> argparse.ArgumentParser:
    heading = "parameters (section.key = default):\n"
    parser = argparse.ArgumentParser(
        prog="frcnn", description="Faster R-CNN (VGG-16) experiment pipeline.",
        epilog="`frcnn COMMAND --help` lists the parameters COMMAND reads.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"frcnn {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parsers = {}
    for name, (_, text, sections) in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text,
                           epilog=heading + describe(sections),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _common(p)
        parsers[name] = p
    parsers["train"].add_argument("--stage", choices=("rpn", "frcnn"), required=True,
                                  help="rpn: the RPN alone; frcnn: the whole detector, "
                                       "initialised from train.rpn_model")
    parsers["sweep"].add_argument("--resume", action="store_true",
                                  help="continue an interrupted sweep (Tune restore) without "
                                       "repeating finished trials")
    parsers["anchors"].add_argument("--split", default="test", choices=("train", "val", "test"),
                                    help="prepared split to measure the coverage on")
    parsers["anchors"].add_argument("--fit", action="store_true",
                                    help="fit anchor shapes to the train split's boxes "
                                         "(class-balanced coverage on the stride grid)")
    parsers["anchors"].add_argument("--num", type=int, default=9, metavar="K",
                                    help="shapes to fit (default 9)")
    parsers["anchors"].add_argument("--out", default="overlays/fitted_anchors.yaml",
                                    metavar="FILE", help="the params overlay --fit writes")
    parsers["predict"].add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parsers["predict"].add_argument("--model", default=None,
                                    help="model file (default: train.frcnn_model)")
    parsers["predict"].add_argument("--draw", default=None, metavar="DIR",
                                    help="write annotated images to DIR instead of printing JSON")
    return parser


def resolve_config(params: Sequence[str] | None, overrides: Sequence[str]) -> Config:
    """Load the config; with no --params, params.yaml in the working directory (or defaults).
    The environment's URIs are checked as the config's are: no credentials in them."""
    check_no_credentials({name: os.environ[name] for name in URI_VARIABLES
                          if os.environ.get(name)})
    if params is None:
        params = ["params.yaml"] if Path("params.yaml").is_file() else []
        if not params:
            print("frcnn: no params.yaml here; using built-in defaults", file=sys.stderr)
    return load_config(params, overrides)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = f"frcnn {args.command}" + (f" --stage {args.stage}" if args.command == "train"
                                         else "")
    try:
        cfg = resolve_config(args.params, args.overrides)
        module = importlib.import_module(COMMANDS[args.command][0])
        return int(module.run(cfg, args) or 0)
    except ConfigError as exc:
        print(f"{command}: invalid parameters: {redact(str(exc))}", file=sys.stderr)
        return 2
    except PipelineError as exc:
        print(f"{command}: {redact(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

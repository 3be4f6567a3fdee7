"""The ``frcnn`` command: help texts, parameter errors (exit 2, key named), a stage's expected
failures (exit 1, one line), Ctrl-C (130), ``python -m pipeline``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import COMMANDS, main
from pipeline.errors import DataError, MissingInputError
from tests.support import BIN, ROOT
from tests.support.procs import subprocess_env

PARAMS = str(ROOT / "params.yaml")
FRCNN = BIN / "frcnn"


def test_top_level_help_lists_every_command_and_the_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for command in COMMANDS:
        assert command in text
    assert "data.source" not in text          # parameters: each command's own --help
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out == f"frcnn {version('frcnn')}\n"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_subcommand_explains_itself_and_the_parameters_it_reads(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: frcnn {command}" in text
    assert "--params PATH" in text and "--set SECTION.KEY=VALUE" in text
    assert "data.on_invalid = 'error'  (error | skip)" in text
    assert ("data.resize = 'stretch'  (stretch | letterbox)" in text)
    reads = COMMANDS[command][2]
    assert ("sweep.num_samples" in text) == (reads is None or "sweep" in reads)
    assert ("train.lr" in text) == (reads is None or "train" in reads)


@pytest.mark.parametrize("override, fragments", [
    ("data.bogus=1", ["unknown key data.bogus", "allowed:", "source"]),
    ("data.image_size=8", ["data.image_size", "out of range", ">= 32"]),
    ("data.image_size=big", ["data.image_size", "expected an integer"]),
    ("data.resize=crop", ["data.resize", "allowed: stretch, letterbox"]),
    ("data.on_invalid=ignore", ["data.on_invalid", "allowed: error, skip"]),
    ("data.split=imagesets", ["data.split", "needs data.source=voc:PATH"]),
    ("data.classes=[a]", ["data.classes", "not used with data.source=synthetic"]),
    ("data.source=ftp://x", ["data.source", "synthetic | voc:PATH | coco:PATH_TO_JSON"]),
])
def test_bad_parameter_exits_2_naming_the_key_before_any_work(tmp_path, capsys, monkeypatch,
                                                             override, fragments):
    monkeypatch.chdir(tmp_path)
    code = main(["prepare", "--params", PARAMS, "--set", f"data.out_dir={tmp_path / 'out'}",
                 "--set", override])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("frcnn prepare: invalid parameters: ")
    for fragment in fragments:
        assert fragment in err
    assert list(tmp_path.iterdir()) == []   # nothing written


@pytest.mark.parametrize("error, code, line", [
    (DataError("data/x.xml: object 0: zero-area box"), 1,
     "frcnn prepare: data/x.xml: object 0: zero-area box\n"),
    (MissingInputError("s3://KEY:SECRET@b/p: not found"), 1, "frcnn prepare: s3://***@b/p: not found\n"),
    (KeyboardInterrupt(), 130, ""),
])
def test_expected_failures_are_one_line_and_an_exit_code(monkeypatch, capsys, tmp_path, error,
                                                         code, line):
    import pipeline.prepare

    def fail(cfg, args):
        raise error

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pipeline.prepare, "run", fail)
    assert main(["prepare", "--params", PARAMS]) == code
    assert capsys.readouterr().err == line


def test_anything_else_is_a_bug_and_keeps_its_traceback(monkeypatch, tmp_path):
    import pipeline.prepare

    def fail(cfg, args):
        raise ZeroDivisionError("a bug")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pipeline.prepare, "run", fail)
    with pytest.raises(ZeroDivisionError, match="a bug"):
        main(["prepare", "--params", PARAMS])


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = subprocess_env(PYTHONPATH=str(ROOT), MLFLOW_TRACKING_URI=f"sqlite:///{cwd / 'mlflow.db'}")
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_console_script_exit_codes(tmp_path):
    if not FRCNN.is_file():
        pytest.skip(f"no frcnn console script beside {sys.executable} (pip install -e .)")
    bad = _run([str(FRCNN), "prepare", "--params", PARAMS, "--set", "rpn.pos_iou=2"], tmp_path)
    assert bad.returncode == 2 and "rpn.pos_iou: 2.0 is out of range" in bad.stderr
    data = tmp_path / "voc" / "Annotations"
    data.mkdir(parents=True)
    empty = _run([str(FRCNN), "prepare", "--params", PARAMS, "--set", "data.source=voc:voc"],
                 tmp_path)
    assert empty.returncode == 1
    assert empty.stderr.startswith("frcnn prepare: voc/Annotations: no annotation files")


def test_python_dash_m_pipeline_prepares(tmp_path):
    done = _run([sys.executable, "-m", "pipeline", "prepare", "--params", PARAMS,
                 "--set", "data.synthetic_images=3", "--set", "data.image_size=32",
                 "--set", "data.val_fraction=0", "--set", "data.test_fraction=0",
                 "--set", "data.num_workers=1"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "prepared 3 images (train 3, val 0, test 0)" in done.stdout
    info = json.loads((tmp_path / "data" / "prepared" / "classes.json").read_text())
    assert info["image_size"] == 32


def test_without_params_yaml_the_defaults_apply(tmp_path):
    done = _run([sys.executable, "-m", "pipeline", "prepare", "--set", "data.synthetic_images=2",
                 "--set", "data.image_size=32", "--set", "data.val_fraction=0",
                 "--set", "data.test_fraction=0", "--set", "data.num_workers=1"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "no params.yaml here; using built-in defaults" in done.stderr
    assert (tmp_path / "data" / "prepared" / "train.parquet").is_file()

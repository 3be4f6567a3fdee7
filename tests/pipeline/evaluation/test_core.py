"""The evaluate stage: its core against loop references, metrics, files, errors, a real model."""

from __future__ import annotations

import io as stdio
import json
import math
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from detector.anchors import AnchorGenerator, generate_anchors
from detector.rpn import ProposalSettings
from pipeline import evaluate as E
from pipeline import recall as R
from pipeline.config import Config
from tests.pipeline.test_recall import best_iou_reference

SIZE = 64
CLASSES = ["cat", "dog"]


def _png(gen: torch.Generator, size: int) -> bytes:
    pixels = (torch.rand(size, size, 3, generator=gen) * 255).byte().numpy()
    buf = stdio.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def make_prepared(root: Path, counts: dict[str, int], size: int = SIZE, seed: int = 0) -> Path:
    """A tiny prepared set: random images, 0-4 random boxes each, some difficult."""
    gen = torch.Generator().manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in counts.items():
        rows = []
        for i in range(n):
            g = i % 5
            xy = torch.rand(g, 2, generator=gen) * size * 0.6
            wh = torch.rand(g, 2, generator=gen) * size * 0.35 + 4
            boxes = torch.cat([xy, (xy + wh).clamp(max=size)], 1)
            rows.append({"image_id": f"{split}_{i:03d}", "source": "test", "orig_width": size,
                         "orig_height": size, "image": _png(gen, size),
                         "boxes": boxes.tolist(),
                         "labels": torch.randint(1, len(CLASSES) + 1, (g,), generator=gen).tolist(),
                         "difficult": [j == 2 for j in range(g)]})
        pd.DataFrame(rows).to_parquet(root / f"{split}.parquet", index=False)
    (root / "classes.json").write_text(json.dumps({"classes": CLASSES, "image_size": size}))
    return root


class FakeModel(nn.Module):
    """Returns scripted proposals / detections image by image, honouring the eval top-N."""

    def __init__(self, proposals: list[torch.Tensor], detections: list[dict] | None = None):
        super().__init__()
        self.rpn = types.SimpleNamespace(
            proposal_settings=ProposalSettings(post_nms_top_n_test=300),
            anchor_generator=AnchorGenerator(stride=16, scales=(1.0, 2.0), ratios=(0.5, 1.0)))
        self.proposals, self.detections, self.seen = proposals, detections, 0
        self.top_n_seen = set()

    def propose(self, images):
        n = self.rpn.proposal_settings.post_nms_top_n_test
        self.top_n_seen.add(n)
        out = [(p[:n], torch.linspace(1, 0, p[:n].shape[0]))
               for p in self.proposals[self.seen:self.seen + images.shape[0]]]
        self.seen += images.shape[0]
        return out

    def forward(self, images):                # the batch that propose() just saw
        return self.detections[self.seen - images.shape[0]:self.seen]


def random_proposals(gen, count):
    xy = torch.rand(count, 2, generator=gen) * SIZE * 0.8
    wh = torch.rand(count, 2, generator=gen) * SIZE * 0.4 + 2
    return torch.cat([xy, xy + wh], 1)


@pytest.fixture()
def prepared(tmp_path) -> Path:
    return make_prepared(tmp_path / "prepared", {"test": 7, "val": 3})


def test_recall_table_through_the_core_matches_loop_reference(prepared):
    splits = [E.read_split(prepared / "test.parquet", "test")]
    gen = torch.Generator().manual_seed(1)
    counts = [40, 0, 3, 400, 17, 2500, 1]                    # none, fewer, more than budgets
    model = FakeModel([random_proposals(gen, c) for c in counts])
    budgets = (1, 5, 30, 1000, 2000)
    res = E.evaluate_model(rpn_model=model, detector=None, splits=splits, budgets=budgets,
                           num_classes=2, image_size=SIZE, batch_size=3, progress=False)
    assert model.top_n_seen == {2000}                                   # raised to max budget
    assert model.rpn.proposal_settings.post_nms_top_n_test == 300       # and restored
    table = res.table
    assert tuple(table.columns) == R.TABLE_COLUMNS
    anchors = generate_anchors((SIZE // 16, SIZE // 16), 16, (1.0, 2.0), (0.5, 1.0))
    split = splits[0]
    for i, image_id in enumerate(split.image_ids):
        rows = table[table["image_id"] == image_id]
        g = split.boxes[i].shape[0]
        assert len(rows) == g * (len(budgets) + 1)
        if g == 0:
            continue
        props = model.proposals[i][:2000]
        ref = best_iou_reference(split.boxes[i], props, budgets)             # (G, B)
        rpn = rows[rows["budget"] != -1].sort_values(["gt_index", "budget"])
        np.testing.assert_allclose(rpn["best_iou"].to_numpy().reshape(g, -1), ref.numpy(),
                                   atol=1e-5)
        ref_anchor = best_iou_reference(split.boxes[i], anchors, [anchors.shape[0]])[:, 0]
        np.testing.assert_allclose(rows[rows["budget"] == -1]["best_iou"], ref_anchor, atol=1e-5)
        per_box = rows.groupby("gt_index")["difficult"]
        assert (per_box.nunique() == 1).all()
        assert per_box.first().tolist() == split.difficult[i].tolist()
        assert (rows["split"] == "test").all()
    summary = res.summary
    available = summary[(summary["budget"] == 2000) & (summary["size"] == "all")]
    assert available["num_proposals"].iloc[0] == pytest.approx(
        np.mean([min(c, 2000) for c in counts]))
    assert summary.loc[summary["budget"] == -1, "num_proposals"].iloc[0] == anchors.shape[0]


def _perfect_model(split_data):
    """Proposals: the image's boxes first, then junk; detections: the boxes, labelled right.
    One object serves as RPN and detector (``forward`` answers the batch just proposed)."""
    props, dets = [], []
    for split in split_data:
        for boxes, labels in zip(split.boxes, split.labels):
            props.append(torch.cat([boxes, torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3)]))
            dets.append({"boxes": boxes.clone(), "scores": torch.full((boxes.shape[0],), 0.9),
                         "labels": labels.clone()})
    return FakeModel(props, dets)


def test_metrics_and_outputs_for_a_perfect_model(prepared, tmp_path):
    splits = [E.read_split(prepared / f"{s}.parquet", s) for s in ("test", "val")]
    model = _perfect_model(splits)
    budgets = (50, 100, 300, 1000, 2000)
    res = E.evaluate_model(rpn_model=model, detector=model, splits=splits,
                           budgets=budgets, num_classes=2, image_size=SIZE, batch_size=2,
                           num_pictures=2, progress=False)
    values = E.metrics(res, ["test", "val"], budgets, CLASSES)
    for key in ("recall@0.5/300", "recall@0.7/300", "AR@100", "AR@300", "AR@1000", "mAP@0.5"):
        assert values[key] == 1.0, key
    assert values["AP@0.5/cat"] == 1.0 and values["AP@0.5/dog"] == 1.0
    assert 0.0 <= values["anchors/AR"] <= 1.0 and "anchors/recall@0.5" in values
    assert values["num_images"] == 7 and values["num_gt"] == sum(i % 5 for i in range(7))
    assert values["val"]["AR@300"] == 1.0 and values["val"]["num_images"] == 3

    paths = E.OutputPaths(tmp_path / "reports", tmp_path / "metrics" / "evaluate.json")
    written = E.write_outputs(res, values, paths, "test", CLASSES)
    assert all(p.is_file() for p in written)
    table = pd.read_parquet(paths.recall_table)
    assert tuple(table.columns) == R.TABLE_COLUMNS and set(table["split"]) == {"test", "val"}
    summary = pd.read_parquet(paths.recall_summary)
    assert tuple(summary.columns) == R.SUMMARY_COLUMNS
    assert set(summary["size"]) <= set(R.SIZES) and set(summary["metric"]) == {"recall", "AR"}
    iou_csv = pd.read_csv(paths.plots / "recall_vs_iou.csv")
    assert list(iou_csv.columns) == ["iou", *(f"top{b}" for b in budgets), "anchors"]
    assert len(iou_csv) == 10 and (iou_csv["top300"] == 1.0).all()
    prop_csv = pd.read_csv(paths.plots / "recall_vs_proposals.csv")
    assert list(prop_csv.columns) == ["budget", "recall@0.5", "recall@0.7"]
    assert prop_csv["budget"].tolist() == list(budgets)
    for png in ("recall_vs_iou.png", "recall_vs_proposals.png"):
        assert (paths.plots / png).stat().st_size > 1000
    pictures = sorted(paths.pictures.glob("*.png"))
    assert [p.name for p in pictures] == ["test_test_000.png", "test_test_001.png"]
    with Image.open(pictures[1]) as img:
        assert img.size == (SIZE, SIZE)
    assert json.loads(paths.metrics.read_text()) == values


def test_mlflow_metric_names_are_valid():
    from mlflow.utils.validation import _validate_metric_name

    names = E.mlflow_metrics({"recall@0.5/300": 0.5, "AP@0.5/red+cell": 1.0,
                              "val": {"AR@300": 0.25}})
    assert names == {"recall_at_0.5/300": 0.5, "AP_at_0.5/red_cell": 1.0, "val/AR_at_300": 0.25}
    for name in names:
        _validate_metric_name(name)


def _config(tmp_path: Path, prepared: Path, **extra) -> Config:
    return Config().replace({
        "data.out_dir": str(prepared), "eval.reports_dir": str(tmp_path / "reports"),
        "eval.metrics_path": str(tmp_path / "metrics" / "evaluate.json"),
        "train.rpn_model": str(tmp_path / "models" / "rpn.pt"),
        "train.frcnn_model": str(tmp_path / "models" / "frcnn.pt"),
        "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}", **extra})


def test_missing_inputs_are_named(tmp_path, capsys):
    cfg = _config(tmp_path, tmp_path / "nowhere")
    assert E.run(cfg) == 1
    assert str(tmp_path / "nowhere" / "classes.json") in capsys.readouterr().err
    prepared = make_prepared(tmp_path / "prepared", {"test": 1, "val": 1})
    assert E.run(_config(tmp_path, prepared)) == 1
    assert str(tmp_path / "models" / "rpn.pt") in capsys.readouterr().err
    (prepared / "val.parquet").unlink()
    assert E.run(_config(tmp_path, prepared)) == 1
    assert str(prepared / "val.parquet") in capsys.readouterr().err


def _tiny_detector(num_classes: int, size: int, **kw):
    from detector.model import FasterRCNN
    torch.manual_seed(0)
    return FasterRCNN(num_classes, image_size=size, roi_hidden_dim=32, **kw)


def test_real_model_gives_more_than_its_test_top_n(tmp_path):
    """A real (untrained) detector: the top-N is raised so large budgets see more proposals."""
    size = 160
    prepared = make_prepared(tmp_path / "p", {"test": 2}, size=size)
    model = _tiny_detector(2, size, rpn_post_nms_top_n_test=20, rpn_min_size=0.0)
    res = E.evaluate_model(rpn_model=model, detector=model,
                           splits=[E.read_split(prepared / "test.parquet", "test")],
                           budgets=(10, 20, 500), num_classes=2, image_size=size,
                           progress=False)
    counts = res.summary.drop_duplicates(["budget"]).set_index("budget")["num_proposals"]
    assert counts[10] == 10 and counts[20] == 20 and counts[500] > 20
    assert counts[-1] == (size // 16) ** 2 * 9
    assert set(res.ap["test"]) == {1, 2}


@pytest.mark.slow
def test_run_writes_everything_and_logs_to_mlflow(tmp_path, monkeypatch, capsys):
    from detector.serialization import save_model
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    size = 64
    prepared = make_prepared(tmp_path / "prepared", {"test": 3, "val": 2}, size=size)
    cfg = _config(tmp_path, prepared, **{"eval.proposal_budgets": [5, 50, 300],
                                         "eval.num_pictures": 2})
    model = _tiny_detector(2, size)
    save_model(cfg.train.rpn_model, model)
    save_model(cfg.train.frcnn_model, model)
    assert E.run(cfg) == 0
    out = capsys.readouterr().out
    assert "AR@300" in out and "mAP@0.5" in out
    values = json.loads(Path(cfg.eval.metrics_path).read_text())
    assert {"recall@0.5/300", "recall@0.7/300", "AR@300", "mAP@0.5", "val"} <= set(values)
    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    run, = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "evaluate" and run.info.status == "FINISHED"
    assert run.data.metrics["AR_at_300"] == pytest.approx(values["AR@300"])
    assert run.data.metrics["val/AR_at_300"] == pytest.approx(values["val"]["AR@300"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "reports")}
    assert {"reports/proposal_recall.parquet", "reports/recall_summary.parquet",
            "reports/plots", "reports/pictures"} <= artifacts
    assert not math.isnan(values["AR@300"])


# --------------------------------------------------------------------------------------------
# The DVC stage


def test_dvc_stage_declares_inputs_parameters_and_outputs():
    from tests.conftest import ROOT

    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    stage = spec["stages"]["evaluate"]
    cfg = Config()
    paths = E.OutputPaths.from_config(cfg)
    modules = {f"pipeline/{m}.py" for m in ("evaluate", "recall", "voc_ap", "plots", "data",
                                            "tracking", "config", "io")}
    detector = {f"detector/{p.name}" for p in (ROOT / "detector").glob("*.py")}
    assert modules | detector | {cfg.data.out_dir, cfg.train.rpn_model, cfg.train.frcnn_model} \
        <= set(stage["deps"])
    assert set(stage["params"]) == {"data.out_dir", "train.rpn_model", "train.frcnn_model",
                                    "eval.splits", "eval.proposal_budgets", "eval.num_pictures",
                                    "eval.reports_dir", "eval.metrics_path"}
    outs = {next(iter(o)) if isinstance(o, dict) else o for o in stage["outs"]}
    assert outs == {str(p) for p in (paths.recall_table, paths.recall_summary, paths.pictures,
                                     paths.plots / "recall_vs_iou.csv",
                                     paths.plots / "recall_vs_proposals.csv")}
    assert [next(iter(m)) for m in stage["metrics"]] == [str(paths.metrics)]
    assert {next(iter(p)) for p in stage["plots"]} == {
        str(paths.plots / "recall_vs_iou.png"), str(paths.plots / "recall_vs_proposals.png")}
    plots = {next(iter(p)): next(iter(p.values())) for p in spec["plots"]}
    iou_columns = [f"top{b}" for b in cfg.eval.proposal_budgets] + ["anchors"]
    assert plots["recall_vs_iou"]["y"] == {str(paths.plots / "recall_vs_iou.csv"): iou_columns}
    assert plots["recall_vs_proposals"]["y"] == {
        str(paths.plots / "recall_vs_proposals.csv"): ["recall@0.5", "recall@0.7"]}


@pytest.mark.slow
def test_dvc_repro_end_to_end_at_a_small_size(tmp_path):
    """The whole `dvc repro` (prepare, train_rpn, train_frcnn, evaluate, sweep) for real (Ray,
    MLflow, DVC) at 128 x 128 with anchors of 32 and 64 pixels, then every evaluate output,
    the sweep's outputs, `dvc metrics show`, `dvc plots show`, and a clean `dvc status`."""
    import os
    import shutil
    import subprocess
    import sys

    from tests.conftest import ROOT

    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "dvc").is_file() or shutil.which("git") is None:
        pytest.skip("needs git and dvc (in the virtual environment)")
    repo = tmp_path / "repo"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("pipeline", "detector", ".dvc"):
        shutil.copytree(ROOT / folder, repo / folder, ignore=ignore)
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(synthetic_images=10, image_size=128, num_workers=1)
    params["train"].update(max_steps=2, num_workers=1)
    params["roi"].update(hidden_dim=64)
    params["anchors"].update(scales=[2, 4])  # 32 and 64 px: inside a 128 px image
    params["rpn"].update(min_size=4.0)
    params["eval"].update(num_pictures=2)
    params["sweep"].update(image_size=64, max_train_images=4, num_samples=1)  # 4 trials: test_sweep_cluster
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, DVC_NO_ANALYTICS="1", RAY_AUTH_MODE="disabled",
               RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(repo),
               PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
               GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
               GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com")
    env.pop("MLFLOW_TRACKING_URI", None)

    def sh(*args: str) -> str:
        done = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    sh("git", "init", "-q")
    sh("git", "add", "-A")
    sh("git", "commit", "-q", "-m", "fresh clone")
    out = sh(str(bin_dir / "dvc"), "repro")
    for stage in ("prepare", "train_rpn", "train_frcnn", "evaluate", "sweep"):
        assert f"Running stage '{stage}'" in out
    assert "AR@300" in out and "sweep: best trial" in out

    paths = E.OutputPaths(repo / "reports", repo / "metrics" / "evaluate.json")
    table = pd.read_parquet(paths.recall_table)
    assert tuple(table.columns) == R.TABLE_COLUMNS and len(table) > 0
    assert set(table["split"]) == {"test", "val"} and -1 in set(table["budget"])
    summary = pd.read_parquet(paths.recall_summary)
    assert tuple(summary.columns) == R.SUMMARY_COLUMNS
    assert list(pd.read_csv(paths.plots / "recall_vs_iou.csv").columns) == \
        ["iou", "top50", "top100", "top300", "top1000", "top2000", "anchors"]
    assert list(pd.read_csv(paths.plots / "recall_vs_proposals.csv").columns) == \
        ["budget", "recall@0.5", "recall@0.7"]
    for png in ("recall_vs_iou.png", "recall_vs_proposals.png"):
        assert (paths.plots / png).stat().st_size > 1000
    assert len(list(paths.pictures.glob("*.png"))) == 2
    values = json.loads(paths.metrics.read_text())
    assert {"recall@0.5/300", "recall@0.7/300", "AR@100", "AR@300", "AR@1000", "mAP@0.5",
            "val"} <= set(values)

    shown = sh(str(bin_dir / "dvc"), "metrics", "show", "--json")
    assert "recall@0.5/300" in shown and "mAP@0.5" in shown
    plots = json.loads(sh(str(bin_dir / "dvc"), "plots", "show", "--json"))["data"]
    assert {"recall_vs_iou", "recall_vs_proposals"} <= set(plots)
    assert plots["recall_vs_iou"][0]["type"] == "vega"
    assert plots[str(Path("reports/plots/recall_vs_iou.png"))][0]["type"] == "image"

    trials = pd.read_parquet(repo / "reports" / "sweep.parquet")
    assert len(trials) == 1 and set(trials["status"]) == {"finished"}
    assert (repo / "reports" / "sweep.png").stat().st_size > 1000
    best = yaml.safe_load((repo / "sweeps" / "best_params.yaml").read_text())
    assert set(best) <= {"anchors", "rpn", "train"} and "scales" in best["anchors"]
    assert "up to date" in sh(str(bin_dir / "dvc"), "status")
    assert "Running stage" not in sh(str(bin_dir / "dvc"), "repro")  # nothing left to do

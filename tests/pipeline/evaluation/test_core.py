"""pipeline.evaluation.core: the evaluation against loop references, the model's top-N, a real
model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detector import ProposalSettings
from detector.anchors import generate_anchors
from pipeline.anchor_coverage import ceiling_iou
from pipeline.evaluation import core
from pipeline.evaluation import recall as R
from pipeline.annotations import read_ground_truth
from tests.support.factories import write_prepared
from tests.support.fakes import FakeModel, perfect_model
from tests.support.references import best_iou_reference, random_boxes


def test_recall_table_through_the_core_matches_loop_reference(eval_set):
    splits = [eval_set.split("test")]
    size = eval_set.size
    gen = torch.Generator().manual_seed(1)
    counts = [40, 0, 3, 400, 17, 2500, 1]                    # none, fewer, more than budgets
    model = FakeModel([random_boxes(gen, c, size=size * 0.8, min_side=2.0) for c in counts])
    budgets = (1, 5, 30, 1000, 2000)
    res = core.evaluate_model(rpn_model=model, detector=None, splits=splits, budgets=budgets,
                              num_classes=2, image_size=size, batch_size=3, progress=False)
    assert model.top_n_seen == {2000}                                   # raised to max budget
    assert model.rpn.proposal_settings.post_nms_top_n_test == 300       # and restored
    table = res.table
    assert tuple(table.columns) == R.TABLE_COLUMNS
    anchors = generate_anchors((size // 16, size // 16), 16, (1.0, 2.0), (0.5, 1.0))
    split = splits[0]
    for i, image_id in enumerate(split.image_ids):
        rows = table[table["image_id"] == image_id]
        g = split.boxes[i].shape[0]
        assert len(rows) == g * (len(budgets) + 2)          # + the anchors and the ceiling
        if g == 0:
            continue
        props = model.proposals[i][:2000]
        ref = best_iou_reference(split.boxes[i], props, budgets)             # (G, B)
        rpn = rows[rows["budget"] > 0].sort_values(["gt_index", "budget"])
        np.testing.assert_allclose(rpn["best_iou"].to_numpy().reshape(g, -1), ref.numpy(),
                                   atol=1e-5)
        ref_anchor = best_iou_reference(split.boxes[i], anchors, [anchors.shape[0]])[:, 0]
        np.testing.assert_allclose(rows[rows["budget"] == -1]["best_iou"], ref_anchor, atol=1e-5)
        ceiling = ceiling_iou(split.boxes[i], stride=16, image_size=size)
        np.testing.assert_allclose(rows[rows["budget"] == -2]["best_iou"], ceiling, atol=1e-6)
        assert (rows[rows["budget"] == -2]["best_iou"].to_numpy() >= ref_anchor.numpy() - 1e-6).all()
        per_box = rows.groupby("gt_index")["difficult"]
        assert (per_box.nunique() == 1).all()
        assert per_box.first().tolist() == split.difficult[i].tolist()
        assert (rows["split"] == "test").all()
    summary = res.summary
    available = summary[(summary["budget"] == 2000) & (summary["size"] == "all")]
    assert available["num_proposals"].iloc[0] == pytest.approx(
        np.mean([min(c, 2000) for c in counts]))
    assert summary.loc[summary["budget"] == -1, "num_proposals"].iloc[0] == anchors.shape[0]


def test_proposal_top_n_is_restored_after_an_error():
    model = FakeModel([])
    saved = model.rpn.proposal_settings
    with pytest.raises(RuntimeError, match="boom"), core.proposal_top_n(model, 5000):
        assert model.rpn.proposal_settings.post_nms_top_n_test == 5000
        assert model.rpn.proposal_settings.pre_nms_top_n_test >= 5000
        raise RuntimeError("boom")
    assert model.rpn.proposal_settings is saved


def test_image_batches_follow_the_table_and_read_images_as_stored(eval_set):
    split = eval_set.split("test")
    batches = list(core.image_batches(split, batch_size=3))
    assert [list(idx) for idx, _ in batches] == [[0, 1, 2], [3, 4, 5], [6]]
    assert batches[0][1].shape == (3, 3, eval_set.size, eval_set.size)
    (image,) = core.read_images(split, [4])
    np.testing.assert_allclose(np.asarray(image) / 255.0,
                               batches[1][1][1].permute(1, 2, 0).numpy(), atol=1e-6)


def _tiny_detector(num_classes: int, size: int, **kw):
    from detector import FasterRCNN, RoIHeadSettings
    torch.manual_seed(0)
    return FasterRCNN(num_classes, image_size=size, roi_head=RoIHeadSettings(hidden_dim=32), **kw)


@pytest.mark.usefixtures("one_thread")
def test_real_model_gives_more_than_its_test_top_n(tmp_path):
    """A real (untrained) detector: the top-N is raised so large budgets see more proposals."""
    size = 160
    prepared = write_prepared(tmp_path / "p", splits={"test": 2}, size=size,
                              classes=("cat", "dog"), content="noise")
    model = _tiny_detector(2, size, proposals=ProposalSettings(post_nms_top_n_test=20,
                                                               min_size=0.0))
    res = core.evaluate_model(rpn_model=model, detector=model,
                              splits=[read_ground_truth(prepared / "test.parquet", "test")],
                              budgets=(10, 20, 500), num_classes=2, image_size=size,
                              progress=False)
    counts = res.summary.drop_duplicates(["budget"]).set_index("budget")["num_proposals"]
    assert counts[10] == 10 and counts[20] == 20 and counts[500] > 20
    assert counts[-1] == (size // 16) ** 2 * 9
    assert set(res.ap["test"]) == {1, 2}


def test_crowd_regions_are_left_out_of_recall_and_ignored_by_ap(eval_set):
    """COCO's rule: a crowd region is no object to find (no recall row, no anchors / ceiling row)
    and a detection on it is neither right nor wrong (AP as without it)."""
    import dataclasses

    split = eval_set.split("test")
    i = next(k for k, b in enumerate(split.boxes) if b.shape[0] >= 2)
    crowd = [c.clone() for c in split.crowd]
    crowd[i][0] = True
    flagged = dataclasses.replace(split, crowd=crowd)
    kinds = {}
    for name, data in (("plain", split), ("crowd", flagged)):
        model = perfect_model([data])
        # a detection on the crowd region only: it must not count as a false positive
        det = model.detections[i]
        det["boxes"], det["scores"], det["labels"] = det["boxes"][:1], det["scores"][:1], \
            det["labels"][:1]
        kinds[name] = core.evaluate_model(rpn_model=model, detector=model, splits=[data],
                                          budgets=(300,), num_classes=2,
                                          image_size=eval_set.size, progress=False)
    plain, flag = kinds["plain"].table, kinds["crowd"].table
    rows = flag[flag["image_id"] == split.image_ids[i]]
    assert len(flag) == len(plain) - 3                # the region's rpn, anchors, ceiling rows
    assert len(rows) == 3 * (split.boxes[i].shape[0] - 1) and 0 not in set(rows["gt_index"])
    assert set(rows["gt_index"]) == set(range(1, split.boxes[i].shape[0]))  # original indices
    label = int(split.labels[i][0])
    ap_plain, ap_crowd = kinds["plain"].ap["test"][label], kinds["crowd"].ap["test"][label]
    assert ap_crowd.num_gt == ap_plain.num_gt - 1                   # not a box to find
    assert ap_crowd.num_detections == ap_plain.num_detections - 1   # its detection ignored

"""Detection metrics on hand-computed cases: IoU, greedy matching, P/R/F1, COCO mAP."""

import pytest

from src.data.boxes import Box
from src.scoring.metrics import Matching, coco_map, detection_metrics, iou, match_boxes


def exact(value: float):
    # pycocotools averages 101 recall points in floating point: a perfect AP can come out 0.9999999999999999.
    return pytest.approx(value, rel=1e-12, abs=1e-12)


# ---------------------------------------------------------------- iou


def test_iou_identical_disjoint_touching():
    a = Box("cat", 0, 0, 10, 10)
    assert iou(a, a) == 1.0
    assert iou(a, Box("cat", 20, 20, 30, 30)) == 0.0
    assert iou(a, Box("cat", 10, 0, 20, 10)) == 0.0  # sharing an edge is no overlap


def test_iou_partial_overlap():
    # intersection 5x5 = 25; union 100 + 100 - 25 = 175
    assert iou(Box("a", 0, 0, 10, 10), Box("b", 5, 5, 15, 15)) == 25 / 175
    # one inside the other: 50 / 100
    assert iou(Box("a", 0, 0, 10, 10), Box("b", 0, 0, 5, 10)) == 0.5


def test_iou_ignores_labels_and_degenerate_boxes_give_zero():
    assert iou(Box("cat", 0, 0, 10, 10), Box("dog", 0, 0, 10, 10)) == 1.0
    point = Box("cat", 5, 5, 5, 5)
    assert iou(point, point) == 0.0


# ---------------------------------------------------------------- match_boxes


def test_match_leaves_extra_predictions_unmatched():
    truth = [Box("cat", 0, 0, 10, 10)]
    preds = [Box("cat", 0, 0, 10, 8), Box("cat", 0, 0, 10, 10), Box("cat", 50, 50, 60, 60)]
    assert match_boxes(preds, truth) == Matching([(1, 0, 1.0)], [0, 2], [])


def test_match_is_greedy_by_iou_not_by_order():
    # pred 0 overlaps truth 1 best (10/11) but pred 1 is identical to truth 1, so truth 1 goes to pred 1
    # and pred 0 falls back to truth 0 (IoU 90/120). Matching in prediction order would pair 0-1 and 1-0.
    truths = [Box("cat", 0, 0, 10, 10), Box("cat", 2, 0, 12, 10)]
    preds = [Box("cat", 1, 0, 12, 10), Box("cat", 2, 0, 12, 10)]
    assert match_boxes(preds, truths) == Matching([(1, 1, 1.0), (0, 0, 0.75)], [], [])


def test_match_with_no_predictions_or_no_truths():
    boxes = [Box("cat", 0, 0, 10, 10), Box("dog", 5, 5, 20, 20)]
    assert match_boxes([], boxes) == Matching([], [], [0, 1])
    assert match_boxes(boxes, []) == Matching([], [0, 1], [])
    assert match_boxes([], []) == Matching([], [], [])


def test_match_needs_equal_labels_unless_class_agnostic():
    preds, truths = [Box("dog", 0, 0, 10, 10)], [Box("cat", 0, 0, 10, 10)]
    assert match_boxes(preds, truths) == Matching([], [0], [0])
    assert match_boxes(preds, truths, class_agnostic=True) == Matching([(0, 0, 1.0)], [], [])


def test_match_threshold_is_inclusive():
    preds, truths = [Box("cat", 0, 0, 10, 5)], [Box("cat", 0, 0, 10, 10)]  # IoU exactly 0.5
    assert match_boxes(preds, truths, iou_threshold=0.5) == Matching([(0, 0, 0.5)], [], [])
    assert match_boxes(preds, truths, iou_threshold=0.6) == Matching([], [0], [0])


# ---------------------------------------------------------------- coco_map


def test_map_perfect_predictions_is_one():
    first = [Box("cat", 0, 0, 100, 100), Box("dog", 50, 50, 200, 150)]
    second = [Box("cat", 10, 10, 20, 20)]
    assert coco_map([(first, first, True), (second, second, True)]) == (exact(1.0), exact(1.0))


def test_map_without_predictions_or_ground_truth_is_zero():
    truths = [Box("cat", 0, 0, 100, 100)]
    assert coco_map([([], truths, False)]) == (0.0, 0.0)
    assert coco_map([(truths, [], True)]) == (0.0, 0.0)
    assert coco_map([]) == (0.0, 0.0)


def test_map_half_recall_is_51_of_101_recall_points():
    # One of two cats found at precision 1: COCO's interpolated precision is 1 for recall 0.00..0.50.
    truths = [Box("cat", 0, 0, 100, 100), Box("cat", 200, 0, 300, 100)]
    samples = [([Box("cat", 0, 0, 100, 100)], truths, True)]
    map_50, map_50_95 = coco_map(samples)
    assert map_50 == exact(51 / 101)
    assert map_50_95 == exact(51 / 101)


def test_map_50_95_counts_only_thresholds_the_iou_clears():
    # IoU 0.72 clears 0.50, 0.55, 0.60, 0.65, 0.70: 5 of the 10 thresholds.
    samples = [([Box("cat", 0, 0, 100, 72)], [Box("cat", 0, 0, 100, 100)], True)]
    assert coco_map(samples) == (exact(1.0), exact(0.5))


def test_map_ranks_by_score():
    truths = [Box("cat", 0, 0, 100, 100)]
    hit, miss = Box("cat", 0, 0, 100, 100, score=0.9), Box("cat", 500, 500, 600, 600, score=0.1)
    assert coco_map([([miss, hit], truths, True)]) == (exact(1.0), exact(1.0))
    # A false positive ranked above the hit: precision 0.5 at every recall point.
    wrong_rank = [Box("cat", 500, 500, 600, 600, score=0.9), Box("cat", 0, 0, 100, 100, score=0.1)]
    assert coco_map([(wrong_rank, truths, True)]) == (exact(0.5), exact(0.5))


def test_map_prints_nothing(capsys):
    truths = [Box("cat", 0, 0, 100, 100)]
    coco_map([(truths, truths, True)])
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------- detection_metrics

SAMPLES = [
    (  # image 1: the cat found at IoU 0.72, the dog missed by a prediction elsewhere
        [Box("cat", 0, 0, 100, 72), Box("dog", 500, 500, 600, 600)],
        [Box("cat", 0, 0, 100, 100), Box("dog", 200, 200, 300, 300)],
        True,
    ),
    ([], [Box("cat", 0, 0, 100, 100)], False),  # image 2: unparsed answer, cat missed
    ([Box("bird", 0, 0, 50, 50)], [], True),  # image 3: a label with no ground truth anywhere
]


def test_detection_metrics_hand_computed():
    m = detection_metrics(SAMPLES)
    # tp 1 (cat), fp 2 (dog elsewhere, bird), fn 2 (dog, second cat)
    assert (m["num_images"], m["tp"], m["fp"], m["fn"]) == (3, 1, 2, 2)
    assert m["parse_rate"] == exact(2 / 3)
    assert m["mean_iou"] == exact(0.72)
    assert (m["precision"], m["recall"], m["f1"]) == (exact(1 / 3), exact(1 / 3), exact(1 / 3))
    # COCO averages over labels with ground truth (cat, dog; bird has none): cat AP@.5 51/101 (recall 1/2
    # at precision 1), dog 0. At .5:.95 the cat's IoU 0.72 clears 5 of 10 thresholds.
    assert m["map_50"] == exact(51 / 202)
    assert m["map_50_95"] == exact(51 / 404)


def test_detection_metrics_per_label():
    assert detection_metrics(SAMPLES)["per_label"] == {
        "bird": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0},
        "cat": {"precision": 1.0, "recall": 0.5, "f1": exact(2 / 3), "support": 2},
        "dog": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1},
    }


def test_detection_metrics_perfect():
    truths = [Box("cat", 0, 0, 100, 100), Box("dog", 50, 50, 200, 150)]
    m = detection_metrics([(truths, truths, True), ([], [], True)])
    assert (m["parse_rate"], m["mean_iou"], m["precision"], m["recall"], m["f1"]) == (1.0, 1.0, 1.0, 1.0, 1.0)
    assert (m["map_50"], m["map_50_95"]) == (exact(1.0), exact(1.0))


def test_detection_metrics_threshold_changes_matching():
    m = detection_metrics(SAMPLES, iou_threshold=0.75)  # the cat's 0.72 no longer counts
    assert (m["tp"], m["fp"], m["fn"], m["mean_iou"], m["precision"], m["recall"]) == (0, 3, 3, 0.0, 0.0, 0.0)
    assert m["map_50"] == exact(51 / 202)  # mAP's thresholds are COCO's, not this one


def test_detection_metrics_zero_division_is_zero():
    keys = ("parse_rate", "mean_iou", "precision", "recall", "f1", "map_50", "map_50_95")
    cat = Box("cat", 0, 0, 10, 10)
    for samples in ([([], [cat], False)], [([cat], [], False)], []):
        m = detection_metrics(samples)
        assert [m[key] for key in keys] == [0.0] * len(keys), samples
    assert detection_metrics([])["per_label"] == {}


def test_detection_metrics_per_size_uses_coco_areas():
    # SAMPLES' truths are 100x100 (large); the found cat counts as large, the stray bird (50x50) as medium.
    sizes = detection_metrics(SAMPLES)["per_size"]
    assert (sizes["large"]["support"], sizes["large"]["recall"]) == (3, exact(1 / 3))
    assert (sizes["medium"]["support"], sizes["medium"]["predicted"], sizes["medium"]["precision"]) == (
        0,
        1,
        0.0,
    )
    assert sizes["small"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0, "predicted": 0}


# ---------------------------------------------------------------- crowd regions (COCO iscrowd)

CAR = Box("car", 0, 0, 100, 100)
CROWD = Box("car", 200, 0, 452, 84)  # the 252x84 crowd region of the issue


def test_a_prediction_on_a_crowd_region_is_neither_tp_nor_fp_and_the_region_is_no_miss():
    on_crowd = Box("car", 210, 10, 260, 60)  # wholly inside: crowd overlap 1.0, IoU with the region ~0.1
    samples = [([CAR, on_crowd], [CAR], True, [CROWD])]
    metrics = detection_metrics(samples)
    assert (metrics["tp"], metrics["fp"], metrics["fn"], metrics["ignored"]) == (1, 0, 0, 1)
    assert metrics["precision"] == metrics["recall"] == 1.0
    assert metrics["map_50"] == exact(1.0)  # pycocotools got the region as iscrowd
    # Without the region the same prediction is a false positive.
    assert detection_metrics([([CAR, on_crowd], [CAR], True)])["fp"] == 1


def test_crowd_needs_the_same_label_and_enough_of_the_prediction_inside():
    half_out = Box("car", 400, 0, 504, 84)  # 52 of 104 px wide inside: overlap 0.5, inclusive
    mostly_out = Box("car", 420, 0, 524, 84)
    other_label = Box("person", 210, 10, 260, 60)
    matching = match_boxes([half_out, mostly_out, other_label], [], crowd=[CROWD])
    assert matching.ignored_preds == [0] and matching.unmatched_preds == [1, 2]
    agnostic = match_boxes([other_label], [], class_agnostic=True, crowd=[CROWD])
    assert agnostic.ignored_preds == [0]


def test_real_boxes_are_matched_before_crowd_regions():
    truth = Box("car", 200, 0, 300, 84)  # a real car inside the crowd region
    matching = match_boxes([Box("car", 200, 0, 300, 84)], [truth], crowd=[CROWD])
    assert matching.pairs == [(0, 0, 1.0)] and matching.ignored_preds == []


def test_bootstrap_counts_and_map_ignore_crowd_like_pycocotools():
    import random

    import numpy as np

    from src.scoring.bootstrap import METRIC_KEYS, ImageScores, metric_values

    rng = random.Random(3)
    changed = 0
    for _ in range(30):
        samples = []
        for _ in range(rng.randint(1, 4)):
            crowd = [Box(rng.choice("ab"), 0, 0, rng.randint(40, 90), rng.randint(40, 90))]
            truths = [Box(rng.choice("ab"), 50, 50, 50 + rng.randint(5, 40), 50 + rng.randint(5, 40))]
            preds = [
                Box(rng.choice("ab"), x, y, x + rng.randint(5, 50), y + rng.randint(5, 50), rng.random())
                for x, y in ((rng.randint(0, 80), rng.randint(0, 80)) for _ in range(rng.randint(0, 5)))
            ]
            preds += [Box(t.label, t.x1 + rng.randint(-3, 3), t.y1, t.x2, t.y2, rng.random()) for t in truths]
            samples.append((preds, truths, True, crowd))
        ours = metric_values(ImageScores.from_samples(samples), np.ones((1, len(samples))))
        reference = detection_metrics(samples)
        for key in METRIC_KEYS:
            assert ours[key][0] == pytest.approx(reference[key], abs=1e-12), key
        changed += reference["map_50_95"] != detection_metrics([s[:3] for s in samples])["map_50_95"]
    assert changed >= 5  # the cases did test crowd handling in the ranking

"""Bootstrap intervals and paired differences on cases with known answers."""

import random

import numpy as np
import pytest

from src.data.boxes import Box
from src.scoring.bootstrap import (
    METRIC_KEYS,
    ImageScores,
    intervals,
    metric_values,
    paired_difference,
    resample_weights,
)
from src.scoring.metrics import detection_metrics, per_size_metrics, size_of

CAT = Box("cat", 10, 10, 60, 60)
DOG = Box("dog", 100, 100, 150, 140)


def _images(count: int, found_every: int) -> list:
    """`count` images with a cat and a dog each; the model finds both on every `found_every`-th image
    and only the cat on the others (a dog box far away instead)."""
    samples = []
    for i in range(count):
        truths = [CAT, DOG]
        preds = [CAT, DOG] if i % found_every == 0 else [CAT, Box("dog", 300, 300, 320, 320)]
        samples.append((preds, truths, True))
    return samples


def _scores(samples) -> ImageScores:
    return ImageScores.from_samples(samples, [f"img{i}" for i in range(len(samples))])


def _random_samples(rng: random.Random, images: int) -> list:
    def box(label, score=None):
        x, y = rng.randint(0, 80), rng.randint(0, 80)
        return Box(label, x, y, x + rng.randint(5, 40), y + rng.randint(5, 40), score)

    samples = []
    for _ in range(images):
        truths = [box(rng.choice("abc")) for _ in range(rng.randint(0, 4))]
        preds = [
            Box(t.label, t.x1 + rng.randint(-2, 2), t.y1, t.x2 + rng.randint(-2, 2), t.y2, rng.random())
            for t in truths
            if rng.random() < 0.6
        ]
        preds += [box(rng.choice("abc"), rng.choice([None, rng.random()])) for _ in range(rng.randint(0, 2))]
        rng.shuffle(preds)
        samples.append((preds, truths, rng.random() < 0.8))
    return samples


def test_on_all_images_every_metric_equals_detection_metrics_and_pycocotools():
    rng = random.Random(0)
    for _ in range(40):
        samples = _random_samples(rng, rng.randint(1, 6))
        ours = metric_values(_scores(samples), np.ones((1, len(samples))))
        reference = detection_metrics(samples)  # mAP through pycocotools
        for key in METRIC_KEYS:
            assert ours[key][0] == pytest.approx(reference[key], abs=1e-12), key


def test_identical_predictions_differ_by_exactly_zero_and_not_significantly():
    samples = _images(40, found_every=2)
    difference = paired_difference([_scores(samples)], [_scores(samples)], resamples=200)
    for key in METRIC_KEYS:
        assert difference[key]["difference"] == difference[key]["low"] == difference[key]["high"] == 0.0
        assert difference[key]["significant"] is False
    assert difference["f1"]["images"] == 40


def test_a_clearly_better_model_is_declared_better():
    better, worse = _scores(_images(60, found_every=1)), _scores(_images(60, found_every=4))
    difference = paired_difference([better], [worse], resamples=300)
    f1 = difference["f1"]
    # better: F1 1.0; worse: tp = 60 cats + 15 dogs of 120 truths and 120 predictions, F1 0.625.
    assert f1["difference"] == pytest.approx(1.0 - 0.625)
    assert f1["significant"] and 0 < f1["low"] <= f1["difference"] <= f1["high"]
    assert difference["parse_rate"]["significant"] is False  # both always parse
    reverse = paired_difference([worse], [better], resamples=300)["f1"]
    assert reverse["significant"] and reverse["high"] < 0


def test_the_interval_shrinks_as_the_test_set_grows():
    small = intervals([_scores(_images(20, found_every=2))], resamples=400)["f1"]
    large = intervals([_scores(_images(320, found_every=2))], resamples=400)["f1"]
    assert small["value"] == pytest.approx(large["value"])  # the same mix of images
    assert (large["high"] - large["low"]) < (small["high"] - small["low"]) / 2  # ~1/sqrt(16)
    assert small["low"] < small["value"] < small["high"]


def test_resamples_draw_every_image_count_and_reproduce():
    weights = resample_weights(7, resamples=50, seed=3)
    assert weights.shape == (50, 7) and (weights.sum(axis=1) == 7).all()
    assert (weights == resample_weights(7, resamples=50, seed=3)).all()
    assert not (weights == resample_weights(7, resamples=50, seed=4)).all()
    scores = _scores(_random_samples(random.Random(1), 30))
    assert intervals([scores], resamples=100) == intervals([scores], resamples=100)


def test_a_seed_mean_of_equal_seeds_is_the_seed_and_pairs_use_shared_images():
    scores = _scores(_images(30, found_every=3))
    twice, once = intervals([scores, scores], resamples=100), intervals([scores], resamples=100)
    assert all(twice[key] == pytest.approx(once[key]) for key in METRIC_KEYS)
    fewer = _scores(_images(30, found_every=3)[:12])
    assert paired_difference([scores], [fewer], resamples=50)["f1"]["images"] == 12


def test_rows_from_predictions_jsonl_score_like_boxes():
    rows = [
        {
            "image": "a.png",
            "truths": [{"label": "cat", "x1": 10, "y1": 10, "x2": 60, "y2": 60}],
            "predictions": [{"label": "cat", "x1": 10, "y1": 10, "x2": 60, "y2": 60, "score": 0.9}],
            "parsed": True,
        },
        {"image": "a.png", "truths": [], "predictions": [], "parsed": False},
    ]
    scores = ImageScores.from_rows(rows)
    assert scores.keys == ("a.png", "a.png#2")  # a repeated image stays two images
    values = metric_values(scores, np.ones((1, 2)))
    assert (values["precision"][0], values["recall"][0], values["parse_rate"][0]) == (1.0, 1.0, 0.5)


def test_per_size_counts_matches_by_truth_and_misses_by_their_own_size():
    small, medium, large = Box("cat", 0, 0, 31, 32), Box("cat", 0, 0, 32, 32), Box("cat", 0, 0, 96, 96)
    assert (size_of(small), size_of(medium), size_of(large)) == ("small", "medium", "large")
    samples = [
        (
            [Box("cat", 0, 0, 31, 30), Box("cat", 200, 200, 300, 300)],
            [small, Box("cat", 500, 0, 600, 96)],
            True,
        )
    ]
    sizes = per_size_metrics(samples)
    assert sizes["small"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1, "predicted": 1}
    assert sizes["large"]["support"] == 1 and sizes["large"]["predicted"] == 1  # a miss and a stray box
    assert sizes["large"]["f1"] == 0.0 and sizes["medium"]["support"] == 0

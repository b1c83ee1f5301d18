"""Grounding answers: formats of every model family, round trips, and a parser that never raises."""

import random

import pytest

from src.contract.families import FAMILIES
from src.data.boxes import Box, ParsedAnswer, format_answer, parse_answer
from src.planning.pixels import smart_resize

REF, REF_END, BOX, BOX_END = "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>"
CAT = Box("cat", 64, 48, 320, 240)
DOG = Box("dog", 0, 240, 640, 480)


def qwen2(label: str, body: str) -> str:
    return f"{REF}{label}{REF_END}{BOX}{body}{BOX_END}"


# ---------------------------------------------------------------- smart_resize


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((480, 640), (476, 644)),  # already in range: round each side to a multiple of 28
        ((2000, 3000), (812, 1204)),  # above max_pixels: scale down, floor to multiples of 28
        ((20, 30), (56, 84)),  # below min_pixels: scale up, ceil to multiples of 28
        ((911, 1237), (840, 1148)),
    ],
)
def test_smart_resize_matches_qwen_rule(size, expected):
    assert smart_resize(*size) == expected


def test_smart_resize_rejects_extreme_aspect_ratio():
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2010)


# ---------------------------------------------------------------- qwen2_vl


def test_qwen2_format_normalises_to_1000():
    answer = format_answer([CAT, DOG], 640, 480)
    assert answer == qwen2("cat", "(100,100),(500,500)") + qwen2("dog", "(0,500),(1000,1000)")


def test_qwen2_format_clamps_outside_image():
    assert format_answer([Box("cat", -10, -5, 700, 500)], 640, 480) == qwen2("cat", "(0,0),(1000,1000)")


def test_qwen2_parse_maps_back_to_pixels():
    answer = parse_answer(qwen2("cat", "(100,100),(500,500)"), 640, 480)
    assert answer == ParsedAnswer([Box("cat", 64.0, 48.0, 320.0, 240.0)], parsed=True, malformed=0)


def test_qwen2_parse_accepts_whitespace_and_missing_ref():
    text = f"{REF} cat {REF_END} {BOX} ( 100 , 100 ) , ( 500 , 500 ) {BOX_END}{BOX}(0,0),(1000,1000){BOX_END}"
    answer = parse_answer(text, 1000, 1000)
    assert answer.boxes == [Box("cat", 100, 100, 500, 500), Box("", 0, 0, 1000, 1000)]
    assert (answer.parsed, answer.malformed) == (True, 0)


def test_qwen2_parse_swaps_reversed_corners_and_clamps():
    text = qwen2("cat", "(500,600),(100,-20)") + qwen2("dog", "(900,0),(1200,100)")
    answer = parse_answer(text, 1000, 1000)
    assert answer.boxes == [Box("cat", 100, 0, 500, 600), Box("dog", 900, 0, 1000, 100)]


def test_qwen2_empty_answer_round_trips():
    assert format_answer([], 640, 480) == "none"
    assert parse_answer("none", 640, 480) == ParsedAnswer([], parsed=True, malformed=0)
    assert parse_answer(" None.<|im_end|>", 640, 480) == ParsedAnswer([], parsed=True, malformed=0)


def test_qwen2_ignores_chat_end_tokens():
    answer = parse_answer(qwen2("cat", "(100,100),(500,500)") + "<|im_end|><|endoftext|>", 640, 480)
    assert (len(answer.boxes), answer.parsed, answer.malformed) == (1, True, 0)


@pytest.mark.parametrize(
    ("text", "n_boxes", "malformed"),
    [
        (qwen2("cat", "(1,2),(3,4)") + qwen2("dog", "(10,2"), 1, 1),  # cut mid-box after a good one
        (qwen2("cat", "(1,2),(3,4)") + f"{REF}do", 1, 1),  # cut inside the next ref
        (f"{REF}cat{REF_END}{BOX}(100,", 0, 1),  # cut before anything could be read
        (qwen2("cat", "(1,2),(3)"), 0, 1),  # wrong number of coordinates
        (qwen2("cat", "(1,2),(3,4),(5,6)"), 0, 1),
        (qwen2("cat", "(a,b),(c,d)"), 0, 1),  # not numbers
        (f"{REF}cat{REF_END} is somewhere", 0, 1),  # a ref no box follows
        ("There is a cat in the picture.", 0, 0),
        ("", 0, 0),
    ],
)
def test_qwen2_parse_counts_malformed_fragments(text, n_boxes, malformed):
    answer = parse_answer(text, 1000, 1000)
    assert (len(answer.boxes), answer.malformed, answer.parsed) == (n_boxes, malformed, n_boxes > 0)


def test_qwen2_parse_does_not_read_qwen2_5_boxes():
    text = qwen2("cat", "(100,100),(500,500)") + ' [{"bbox_2d": [1, 2, 3, 4], "label": "dog"}]'
    answer = parse_answer(text, 1000, 1000)
    assert answer == ParsedAnswer([Box("cat", 100, 100, 500, 500)], parsed=True, malformed=1)


# ---------------------------------------------------------------- qwen2_5_vl


def test_qwen2_5_format_uses_resized_pixels():
    answer = format_answer([CAT, DOG], 640, 480, family="qwen2_5_vl", resized=(240, 320))
    cat, dog = (
        '{"bbox_2d": [32, 24, 160, 120], "label": "cat"}',
        '{"bbox_2d": [0, 120, 320, 240], "label": "dog"}',
    )
    assert answer == f"[{cat}, {dog}]"


def test_qwen2_5_format_defaults_to_smart_resize():
    # 640x480 resizes to 644x476: 64*644/640 = 64.4, 48*476/480 = 47.6, 320*644/640 = 322, 240*476/480 = 238
    answer = format_answer([CAT], 640, 480, family="qwen2_5_vl")
    assert answer == '[{"bbox_2d": [64, 48, 322, 238], "label": "cat"}]'


def test_qwen2_5_parse_maps_back_and_accepts_fences():
    text = '```json\n[\n  {"bbox_2d": [32, 24, 160, 120], "label": "cat"}\n]\n```'
    answer = parse_answer(text, 640, 480, family="qwen2_5_vl", resized=(240, 320))
    assert answer == ParsedAnswer([Box("cat", 64.0, 48.0, 320.0, 240.0)], parsed=True, malformed=0)


def test_qwen2_5_parse_swaps_clamps_and_tolerates_missing_label():
    text = '[{"bbox_2d": [160, 120, 32, -5]}, {"bbox_2d": [300, 0, 400, 10], "label": "dog"}]'
    answer = parse_answer(text, 640, 480, family="qwen2_5_vl", resized=(240, 320))
    assert answer.boxes == [Box("", 64.0, 0.0, 320.0, 240.0), Box("dog", 600.0, 0.0, 640.0, 20.0)]


def test_qwen2_5_parse_clamps_huge_integers():
    text = '[{"bbox_2d": [0, 0, 1' + "0" * 400 + ", 1" + "0" * 400 + "]}]"
    answer = parse_answer(text, 640, 480, family="qwen2_5_vl", resized=(240, 320))
    assert answer.boxes == [Box("", 0.0, 0.0, 640.0, 480.0)]


def test_qwen2_5_empty_answer_round_trips():
    assert format_answer([], 640, 480, family="qwen2_5_vl") == "[]"
    expected = ParsedAnswer([], parsed=True, malformed=0)
    assert parse_answer("[]", 640, 480, family="qwen2_5_vl") == expected
    assert parse_answer("```json\n[]\n```", 640, 480, family="qwen2_5_vl") == expected


GOOD = '{"bbox_2d": [1, 2, 3, 4], "label": "cat"}'


@pytest.mark.parametrize(
    ("text", "n_boxes", "malformed"),
    [
        (f'[{GOOD}, {{"bbox_2d": [10, 20, 3', 1, 1),  # truncated after a good object
        (f'```json\n[{GOOD}, {{"bbox_2d": [5, 6, 7, 8], "label": "dog"}}', 2, 0),  # cut before "]"
        ('[{"bbox_2d": [1, 2, 3], "label": "cat"}]', 0, 1),  # wrong number of coordinates
        ('[{"bbox_2d": ["a", 2, 3, 4], "label": "cat"}]', 0, 1),  # not numbers
        ('[{"bbox_2d": [NaN, 2, 3, 4], "label": "cat"}]', 0, 1),
        ('[{"bbox_2d": [true, 2, 3, 4], "label": "cat"}]', 0, 1),
        (f'[{GOOD}, {{"bbox_2d": [1, 2, 3, 4] "label": "dog"}}]', 1, 1),  # broken JSON in one object
        (f"[{GOOD}, 7]", 1, 1),  # an item that is not an object
        (f"The cat: {GOOD}.", 1, 0),  # prose around a single object
        ("No objects here.", 0, 0),
        ("[", 0, 0),
        ("", 0, 0),
    ],
)
def test_qwen2_5_parse_counts_malformed_fragments(text, n_boxes, malformed):
    answer = parse_answer(text, 1000, 1000, family="qwen2_5_vl", resized=(1000, 1000))
    assert (len(answer.boxes), answer.malformed, answer.parsed) == (n_boxes, malformed, n_boxes > 0)


def test_qwen2_5_parse_does_not_read_qwen2_boxes():
    text = f"[{GOOD}]" + qwen2("dog", "(100,100),(500,500)")  # not valid JSON: read object by object
    answer = parse_answer(text, 1000, 1000, family="qwen2_5_vl", resized=(1000, 1000))
    assert answer == ParsedAnswer([Box("cat", 1, 2, 3, 4)], parsed=True, malformed=1)


# ---------------------------------------------------------------- qwen3_vl and qwen3_5: JSON, 0-1000


def test_qwen3_format_is_json_on_0_1000_of_the_original_image():
    cat, dog = (
        '{"bbox_2d": [100, 100, 500, 500], "label": "cat"}',
        '{"bbox_2d": [0, 500, 1000, 1000], "label": "dog"}',
    )
    expected = f"[{cat}, {dog}]"
    assert format_answer([CAT, DOG], 640, 480, family="qwen3_vl") == expected
    # No resize changes it: a `resized` meant for qwen2_5_vl is ignored.
    assert format_answer([CAT, DOG], 640, 480, family="qwen3_vl", resized=(240, 320)) == expected


def test_qwen3_format_clamps_outside_image():
    answer = format_answer([Box("cat", -10, -5, 700, 500)], 640, 480, family="qwen3_vl")
    assert answer == '[{"bbox_2d": [0, 0, 1000, 1000], "label": "cat"}]'


def test_qwen3_parse_maps_back_to_pixels_and_accepts_fences():
    text = '```json\n[\n  {"bbox_2d": [100, 100, 500, 500], "label": "cat"}\n]\n```'
    answer = parse_answer(text, 640, 480, family="qwen3_vl")
    assert answer == ParsedAnswer([Box("cat", 64.0, 48.0, 320.0, 240.0)], parsed=True, malformed=0)


def test_qwen3_parse_clamps_to_0_1000_and_swaps_corners():
    text = '[{"bbox_2d": [-5, 1001, 1200, 300], "label": "cat"}, {"bbox_2d": [0, 0, 1' + "0" * 400 + ", 5]}]"
    answer = parse_answer(text, 640, 480, family="qwen3_vl")
    assert answer.boxes == [Box("cat", 0.0, 144.0, 640.0, 480.0), Box("", 0.0, 0.0, 640.0, 2.4)]


def test_qwen3_parse_reads_a_0_999_answer_within_one_unit_of_the_edge():
    answer = parse_answer('[{"bbox_2d": [0, 0, 999, 999], "label": "cat"}]', 640, 480, family="qwen3_vl")
    (box,) = answer.boxes
    assert (box.x1, box.y1) == (0, 0)
    assert 640 - 640 / 1000 <= box.x2 < 640 and 480 - 480 / 1000 <= box.y2 < 480


def test_qwen3_empty_answer_round_trips():
    assert format_answer([], 640, 480, family="qwen3_vl") == "[]"
    expected = ParsedAnswer([], parsed=True, malformed=0)
    assert parse_answer("[]", 640, 480, family="qwen3_vl") == expected
    assert parse_answer("```json\n[]\n```<|im_end|>", 640, 480, family="qwen3_vl") == expected


@pytest.mark.parametrize(
    ("text", "n_boxes", "malformed"),
    [
        (f'[{GOOD}, {{"bbox_2d": [10, 20, 3', 1, 1),  # truncated after a good object
        (f'```json\n[{GOOD}, {{"bbox_2d": [5, 6, 7, 8], "label": "dog"}}', 2, 0),  # cut before "]"
        ('[{"bbox_2d": [1, 2, 3], "label": "cat"}]', 0, 1),  # wrong number of coordinates
        (f'[{GOOD}, {{"bbox_2d": [1, 2, 3, 4] "label": "dog"}}]', 1, 1),  # broken JSON in one object
        (qwen2("dog", "(100,100),(500,500)"), 0, 1),  # qwen2_vl's format: not read
        (f"[{GOOD}]" + qwen2("dog", "(100,100),(500,500)"), 1, 1),
        ("No objects here.", 0, 0),
    ],
)
def test_qwen3_parse_counts_malformed_fragments(text, n_boxes, malformed):
    answer = parse_answer(text, 1000, 1000, family="qwen3_vl")
    assert (len(answer.boxes), answer.malformed, answer.parsed) == (n_boxes, malformed, n_boxes > 0)


def test_qwen2_parse_does_not_read_qwen3_boxes():
    text = format_answer([CAT], 640, 480, family="qwen3_vl")
    assert parse_answer(text, 640, 480) == ParsedAnswer([], parsed=False, malformed=1)


def _random_box(rng: random.Random, width: int, height: int) -> Box:
    x1, x2 = sorted(rng.uniform(0, width) for _ in range(2))
    y1, y2 = sorted(rng.uniform(0, height) for _ in range(2))
    return Box(rng.choice(["cat", "dog", "traffic light"]), x1, y1, x2, y2)


def test_qwen3_round_trip_is_within_one_unit_for_random_boxes_and_sizes():
    rng = random.Random(0)
    for _ in range(300):
        width, height = rng.randint(1, 8000), rng.randint(1, 8000)  # any aspect ratio: no resize involved
        boxes = [_random_box(rng, width, height) for _ in range(rng.randint(1, 8))]
        answer = parse_answer(format_answer(boxes, width, height, "qwen3_vl"), width, height, "qwen3_vl")
        assert answer.parsed and answer.malformed == 0 and len(answer.boxes) == len(boxes)
        for got, want in zip(answer.boxes, boxes, strict=True):
            assert got.label == want.label
            for axis, size in (("x1", width), ("x2", width), ("y1", height), ("y2", height)):
                assert abs(getattr(got, axis) - getattr(want, axis)) <= size / 1000


@pytest.mark.parametrize(
    "text",
    [
        format_answer([CAT, DOG], 640, 480, family="qwen3_vl"),
        f'```json\n[{GOOD}, {{"bbox_2d": [10, 20, 3',
        '[{"bbox_2d": [-5, 0, 1200, 999]}]',
        qwen2("dog", "(100,100),(500,500)"),
        "[]",
        "prose",
    ],
)
def test_qwen3_5_behaves_exactly_like_qwen3_vl(text):
    assert parse_answer(text, 640, 480, "qwen3_5") == parse_answer(text, 640, 480, "qwen3_vl")
    for boxes in ([], [CAT, DOG], BOXES):
        assert format_answer(boxes, 1237, 911, "qwen3_5") == format_answer(boxes, 1237, 911, "qwen3_vl")


# ---------------------------------------------------------------- every family


BOXES = [
    Box("cat", 12.3, 45.6, 789.1, 654.3),
    Box("traffic light", 0, 0, 1237, 911),
    Box("dog", 600.5, 300.25, 601.5, 310.75),
]


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_within_quantisation_error(family):
    width, height = 1237, 911
    answer = parse_answer(format_answer(BOXES, width, height, family), width, height, family)
    assert answer.parsed and answer.malformed == 0
    assert [b.label for b in answer.boxes] == [b.label for b in BOXES]
    for got, want in zip(answer.boxes, BOXES, strict=True):
        for axis, size in (("x1", width), ("x2", width), ("y1", height), ("y2", height)):
            assert abs(getattr(got, axis) - getattr(want, axis)) <= size / 1000


@pytest.mark.parametrize("family", FAMILIES)
def test_every_truncation_reads_a_prefix_of_the_boxes(family):
    width, height = 1237, 911
    text = format_answer(BOXES, width, height, family)
    complete = parse_answer(text, width, height, family).boxes
    for end in range(len(text) + 1):
        answer = parse_answer(text[:end], width, height, family)
        assert answer.boxes == complete[: len(answer.boxes)], text[:end]
        assert answer.parsed == bool(answer.boxes)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000,
        '{"bbox_2d": ' + "[" * 100_000,
        "{" * 1000 + "}" * 999,
        BOX * 50 + BOX_END,
        REF * 50,
        "<|box_end|><|object_ref_end|>",
        '[{"bbox_2d": [1e999, 0, 1, 1]}]',
        '[{"bbox_2d": [1' + "0" * 5000 + ", 0, 1, 1]}]",  # more digits than Python's int() accepts
        '[{"bbox_2d": null}, {"bbox_2d": {"x": 1}}, {"label": "cat"}]',
        "\x00\ud800\n\t```json```",
        "null",
        "42",
    ],
)
def test_parser_never_raises(family, text):
    answer = parse_answer(text, 640, 480, family)
    assert answer.boxes == [] and not answer.parsed


def test_unknown_family_is_an_error():
    with pytest.raises(ValueError, match="unknown model family"):
        format_answer([], 640, 480, family="llava")
    with pytest.raises(ValueError, match="unknown model family"):
        parse_answer("", 640, 480, family="llava")

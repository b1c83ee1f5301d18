"""Grounding answers: turn boxes into the text a Qwen-VL model emits, and parse that text back.

Four model families speak three formats:

* ``qwen2_vl`` -- special tokens, coordinates normalised to integers 0-1000::

      <|object_ref_start|>cat<|object_ref_end|><|box_start|>(100,200),(300,400)<|box_end|>

  Objects are concatenated with no separator. An image with no objects is answered ``none``.
* ``qwen2_5_vl`` -- a JSON list in absolute integer pixels of the *resized* image the model saw
  (``resized=(h, w)``, default :func:`smart_resize` of the original size)::

      [{"bbox_2d": [64, 48, 322, 238], "label": "cat"}]

  The parser also accepts the list inside ```json fences, as Qwen2.5-VL writes it. No objects is ``[]``.
* ``qwen3_vl`` and ``qwen3_5`` -- the same JSON, but integers 0-1000 relative to the *original* image
  (x / width * 1000, y / height * 1000), so any resize keeps the answer valid and ``resized`` is ignored::

      [{"bbox_2d": [100, 100, 500, 500], "label": "cat"}]

  Fences are accepted and no objects is ``[]``, as for ``qwen2_5_vl``.

:class:`Box` always holds pixel coordinates of the original image, so callers never see any model's
coordinate space.

Parsing rules (the parser never raises on any string; a bad ``family`` is a programming error and does):

* A *fragment* is one attempt at an object: for ``qwen2_vl`` a ``<|box_start|>`` (with its optional ref
  in front) or a ref that no box follows; for the JSON families one item of the list, or one ``{...``
  object when the list as a whole is not valid JSON (broken or cut off). Each fragment either gives a box
  or adds one to ``malformed``: cut mid-box, wrong number of coordinates, non-numbers, broken JSON.
* Boxes in another format (special tokens vs JSON) are not read, and each counts as malformed: their
  coordinate space would be a guess, and a model answering in the wrong format is a failure the caller
  should see rather than have papered over. The two JSON formats look alike, so their text is read in
  the coordinate space of the ``family`` asked for.
* Coordinates outside the image (below 0, above 1000 or the resized size) are clamped to its edge. On the
  0-1000 scale 1000 itself is the far edge (some Qwen documents say 0-999; an answer written that way
  is read as is, at most one unit short of the edge).
  Corners given in the wrong order (x2 < x1 or y2 < y1) are swapped, not dropped: the region meant is
  unambiguous, and dropping it would punish recall for a cosmetic slip.
* ``parsed`` is True when at least one box was read, or the text is the family's "no objects" answer.
  Text with nothing readable (prose, empty, only malformed fragments) gives ``parsed=False``.
* Chat end tokens (``<|im_end|>``, ``<|endoftext|>``) left in by decoding with
  ``skip_special_tokens=False`` are ignored.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from src.contract.families import FAMILIES
from src.planning.pixels import smart_resize

NORMALISED = 1000  # the coordinate range of qwen2_vl, qwen3_vl and qwen3_5
EMPTY_ANSWER = {"qwen2_vl": "none", "qwen2_5_vl": "[]", "qwen3_vl": "[]", "qwen3_5": "[]"}
RELATIVE_JSON_FAMILIES = ("qwen3_vl", "qwen3_5")  # JSON on the 0-1000 scale of the original image


@dataclass(frozen=True)
class Box:
    """One object: a label and corners in pixel coordinates of the original image."""

    label: str
    x1: float
    y1: float
    x2: float
    y2: float
    score: float | None = None


@dataclass(frozen=True)
class ParsedAnswer:
    """What :func:`parse_answer` read from one model answer."""

    boxes: list[Box]
    parsed: bool  # False when nothing well-formed could be read
    malformed: int  # fragments that looked like a box but could not be read


# ---------------------------------------------------------------- shared helpers


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")


def _clamp(value: float, high: float) -> float:
    return min(max(value, 0.0), high)


def _to_pixels(coords: Iterable[float], scale_x: float, scale_y: float, limit_x: float, limit_y: float):
    """Model-space (x1, y1, x2, y2) -> original-image pixels, clamped to the model's space first."""
    x1, y1, x2, y2 = coords
    x1, x2 = sorted((_clamp(x1, limit_x), _clamp(x2, limit_x)))
    y1, y2 = sorted((_clamp(y1, limit_y), _clamp(y2, limit_y)))
    return x1 * scale_x, y1 * scale_y, x2 * scale_x, y2 * scale_y


def _strip_chat_tokens(text: str) -> str:
    return re.sub(r"<\|(?:im_end|endoftext)\|>", "", text)


# ---------------------------------------------------------------- qwen2_vl: special tokens, 0-1000

_NUM = r"\s*([-+]?\d+(?:\.\d*)?)\s*"
_POINT = rf"\({_NUM},{_NUM}\)"
_QWEN2_BODY = re.compile(rf"\s*{_POINT}\s*,?\s*{_POINT}\s*")
_NO_TOKEN = r"(?:(?!<\|).)*"  # text up to the next special token, so one box never swallows the next
_REF = rf"<\|object_ref_start\|>(?P<label>{_NO_TOKEN})<\|object_ref_end\|>"
_QWEN2_OBJECT = re.compile(rf"(?:{_REF}\s*)?<\|box_start\|>(?P<body>{_NO_TOKEN})<\|box_end\|>", re.S)
# What is left of a fragment once complete objects are cut out: a ref and/or box_start that never closed.
_QWEN2_DANGLING = re.compile(
    rf"(?:<\|object_ref_start\|>{_NO_TOKEN}<\|object_ref_end\|>\s*)?<\|box_start\|>|<\|object_ref_start\|>",
    re.S,
)


def _format_qwen2(boxes: list[Box], width: int, height: int) -> str:
    def norm(value: float, size: int) -> int:
        return int(_clamp(round(value / size * NORMALISED), NORMALISED))

    return "".join(
        f"<|object_ref_start|>{b.label}<|object_ref_end|><|box_start|>"
        f"({norm(b.x1, width)},{norm(b.y1, height)}),({norm(b.x2, width)},{norm(b.y2, height)})<|box_end|>"
        for b in boxes
    )


def _parse_qwen2(text: str, width: int, height: int) -> ParsedAnswer:
    boxes: list[Box] = []
    malformed = 0
    for match in _QWEN2_OBJECT.finditer(text):
        body = _QWEN2_BODY.fullmatch(match["body"])
        if body is None:
            malformed += 1
            continue
        coords = _to_pixels(
            map(float, body.groups()), width / NORMALISED, height / NORMALISED, NORMALISED, NORMALISED
        )
        boxes.append(Box((match["label"] or "").strip(), *coords))
    rest = _QWEN2_OBJECT.sub(" ", text)
    malformed += len(_QWEN2_DANGLING.findall(rest)) + rest.count('"bbox_2d"')  # JSON boxes: not read
    is_empty_answer = text.strip().rstrip(".").lower() == EMPTY_ANSWER["qwen2_vl"]
    return ParsedAnswer(boxes, bool(boxes) or is_empty_answer, malformed)


# ---------------------------------------------------------------- JSON families
# qwen2_5_vl and qwen3_vl/qwen3_5 differ only in the (h, w) coordinate space the model writes in: the
# resized image's pixels, or 1000 x 1000 over the original image. Both are a per-axis scale, so one
# writer and one parser serve both, given that space.

_FENCE = re.compile(r"```(?:json)?", re.I)
_JSON_OBJECT = re.compile(r"\{[^{}]*\}|\{[^{}]*$")  # flat objects; a trailing one may be cut off


def _json_space(family: str, width: int, height: int, resized: tuple[int, int] | None) -> tuple[int, int]:
    """(h, w) of the coordinate space a JSON family writes in."""
    if family in RELATIVE_JSON_FAMILIES:
        return NORMALISED, NORMALISED
    return resized or smart_resize(height, width)


def _format_json(boxes: list[Box], width: int, height: int, space: tuple[int, int]) -> str:
    rh, rw = space

    def scale(value: float, size: int, new_size: int) -> int:
        return int(_clamp(round(value / size * new_size), new_size))

    items = [
        {
            "bbox_2d": [
                scale(b.x1, width, rw),
                scale(b.y1, height, rh),
                scale(b.x2, width, rw),
                scale(b.y2, height, rh),
            ],
            "label": b.label,
        }
        for b in boxes
    ]
    return json.dumps(items, ensure_ascii=False)


def _is_number(value: object) -> bool:
    # bool is an int subclass; JSON's NaN/Infinity parse to floats but are no coordinates. Huge ints are
    # fine (clamping compares them exactly) but math.isfinite would overflow on them.
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def _box_from_item(item: object, width: int, height: int, space: tuple[int, int]) -> Box | None:
    if not isinstance(item, dict):
        return None
    coords = item.get("bbox_2d")
    if not isinstance(coords, list) or len(coords) != 4 or not all(map(_is_number, coords)):
        return None
    rh, rw = space
    label = item.get("label", "")
    label = label.strip() if isinstance(label, str) else str(label)
    return Box(label, *_to_pixels(coords, width / rw, height / rh, rw, rh))


def _json_items(text: str) -> tuple[list[object] | None, int]:
    """The answer's list items, or (None, unreadable fragments) when it is not one valid JSON value."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # deeply nested brackets overflow the decoder's recursion
        value = None
    if isinstance(value, list):
        return value, 0
    if isinstance(value, dict):
        return [value], 0
    # Broken or truncated list (or prose around it): read object by object.
    items: list[object] = []
    broken = 0
    for fragment in _JSON_OBJECT.findall(text):
        try:
            items.append(json.loads(fragment))
        except (ValueError, RecursionError):
            broken += 1
    return (items or None), broken


def _parse_json(text: str, width: int, height: int, space: tuple[int, int]) -> ParsedAnswer:
    body = _FENCE.sub("", text).strip()
    items, malformed = _json_items(body)
    is_empty_answer = items == [] and malformed == 0
    boxes: list[Box] = []
    for item in items or []:
        box = _box_from_item(item, width, height, space)
        if box is None:
            malformed += 1
        else:
            boxes.append(box)
    malformed += body.count("<|box_start|>")  # qwen2_vl boxes: not read, see the module docstring
    return ParsedAnswer(boxes, bool(boxes) or is_empty_answer, malformed)


# ---------------------------------------------------------------- public API


def format_answer(
    boxes: list[Box],
    width: int,
    height: int,
    family: str = "qwen2_vl",
    resized: tuple[int, int] | None = None,
) -> str:
    """The answer text the model should learn for ``boxes`` on a ``width`` x ``height`` image.

    Coordinates are clamped to the image and nothing else is checked. ``resized`` (h, w) only matters for
    qwen2_5_vl; it defaults to :func:`smart_resize` of the original size.
    """
    _check_family(family)
    if not boxes:
        return EMPTY_ANSWER[family]
    if family == "qwen2_vl":
        return _format_qwen2(boxes, width, height)
    return _format_json(boxes, width, height, _json_space(family, width, height, resized))


def parse_answer(
    text: str, width: int, height: int, family: str = "qwen2_vl", resized: tuple[int, int] | None = None
) -> ParsedAnswer:
    """Read the boxes of one model answer, in pixels of the original ``width`` x ``height`` image.

    Never raises on any ``text``; see the module docstring for what counts as parsed and malformed.
    Bad arguments do raise: an unknown ``family``, or (qwen2_5_vl without ``resized``) an image whose
    aspect ratio :func:`smart_resize` rejects.
    """
    _check_family(family)
    text = _strip_chat_tokens(text if isinstance(text, str) else "")
    if family == "qwen2_vl":
        return _parse_qwen2(text, width, height)
    return _parse_json(text, width, height, _json_space(family, width, height, resized))

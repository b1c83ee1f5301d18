"""Greedy detection predictions of a model on held-out records: boxes, raw text, parsed flag.

Works on any model the worker can start from or write:
  * a full model directory (the base model, for the zero-shot baseline, or a merged model);
  * a PEFT adapter directory (`OUT/adapter/`, r3's `OUT/stage2-llm/adapter/`): its
    `adapter_config.json` names the base (for r3 that is `OUT/stage1-vision/merged`), which is
    loaded in full precision and the adapter applied on top.

    from src.eval.predict import load_for_eval, predict_records
    model, processor, family = load_for_eval("outputs/r4-joint/adapter", device="cpu")
    predictions = predict_records(model, processor, records, family, device="cpu", batch_size="auto")

Generation is batched with left padding and greedy, images of similar size together (largest first) and
as many per batch as free GPU memory holds (`eval_batch_size`); answers are decoded with
skip_special_tokens=False (the box tokens are special tokens) and read by
`src.data.boxes.parse_answer`, which never raises: a garbled or cut-off answer is kept as an
unparsed prediction, never an error. An answer that reaches max_new_tokens without its end token is
marked `truncated` (and counted in GenerationStats): never silent. `python -m src.eval.evaluate` is the
command-line entry point; it sizes max_new_tokens from the data's longest answer
(`src.data.dataset.answer_budget`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from src.data.boxes import Box, parse_answer
from src.data.dataset import DEFAULT_PROMPT
from src.data.records import DetectionRecord
from src.planning.pixels import limits_of_processor, smart_resize

log = logging.getLogger(__name__)
ADAPTER_CONFIG = "adapter_config.json"
DEFAULT_MAX_NEW_TOKENS = 256  # about eight objects in Qwen2-VL's format; evaluation sizes its own
CPU_EVAL_BATCH = 8  # images per generate() call on the CPU, and where GPU memory cannot be read
MAX_EVAL_BATCH = 256  # past this a decoding step is no longer bound by reading the weights once
EVAL_MEMORY_HEADROOM = 0.8  # of the free GPU memory: the allocator's fragmentation and estimate error
# plain: transformers' dynamic KV cache, eager decoding steps (the default). static: a static KV cache,
# with which transformers compiles the decoding step on a GPU (torch.compile; the first batch of each
# shape pays the compile). Measure with `python -m src.bench.decoding` before making it a default.
DECODE_MODES = ("plain", "static")
# fast attention: the LLM's decoding steps attend with query heads grouped onto their key/value heads (no
# 7x copy of the KV cache a step under a padding mask; src/models/decode_attention.py) and the vision
# tower attends in one call a block (src/models/vision_attention.py); off: the models' own SDPA calls.
FAST_ATTENTION = True


@dataclass
class Prediction:
    """What the model answered for one image, next to the truth; boxes in original-image pixels."""

    image: str
    width: int
    height: int
    truths: list[Box]
    boxes: list[Box]
    text: str
    parsed: bool
    malformed: int = 0
    crowd: list[Box] = field(default_factory=list)  # regions evaluation ignores (COCO iscrowd)
    truncated: bool = False  # the answer ran into max_new_tokens before its end token


def resolve_model(model_path: str | Path, search_root: str | Path | None = None) -> tuple[str, str | None]:
    """(base model, adapter dir or None) for a model or adapter directory, or a hub id.

    An adapter's base is read from its adapter_config.json. A relative base path that does not exist
    from the working directory is looked for under `search_root` (a worker output dir), where r3's
    stage-1 model lives.
    """
    path = Path(model_path)
    config = path / ADAPTER_CONFIG
    if not config.is_file():
        return str(model_path), None
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{config}: no base_model_name_or_path; cannot tell which model it adapts")
    return locate(base, search_root), str(path)


def locate(name: str, search_root: str | Path | None = None) -> str:
    """A path as written by a worker (often relative to its working directory), found from here.

    Tried in turn: the path itself, then its last one, two or three parts under `search_root`.
    Anything not found is returned unchanged (it may be a hub id; loading then says what is wrong).
    """
    path = Path(name)
    if path.exists() or path.is_absolute() or search_root is None:
        return name
    parts = path.parts
    for keep in (1, 2, 3):
        candidate = Path(search_root, *parts[-keep:])
        if len(parts) >= keep and candidate.exists():
            return str(candidate)
    return name


def load_for_eval(
    model_path: str | Path,
    device: str = "cpu",
    search_root: str | Path | None = None,
    pixels: tuple[int | None, int | None] = (None, None),
):
    """(model in eval mode, processor, family) for a model dir, an adapter dir or a hub id.

    An adapter is applied to its base loaded in full precision (bf16 on GPUs, fp32 on the CPU), even
    when it was trained on a 4-bit base (r1, r3 stage 2): evaluating a QLoRA adapter on the
    unquantized weights is standard and avoids bitsandbytes at eval time; the scores can differ
    slightly from the 4-bit model's (the demo's tiny r1: precision 0.22 here, 0.25 on its 4-bit base).
    The adapter is merged in, so generation pays no LoRA overhead. Images are resized as training
    resized them: by the processor saved beside an adapter, else by `pixels` (--min-pixels, --max-pixels)
    with training's default cap.
    """
    from src.models.loader import load_model, load_processor, model_family

    base, adapter = resolve_model(model_path, search_root)
    model = load_model(base, device)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    # The worker saves the processor beside the adapter; an adapter saved without one uses the base's.
    if adapter and Path(adapter, "tokenizer_config.json").is_file():
        processor = load_processor(adapter, cap=False)
    else:
        processor = load_processor(base, *pixels)
    model.eval()
    return model, processor, model_family(base)


def _prompt_texts(processor, count: int, prompt: str) -> list[str]:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return [text] * count


def _resized(processor, record: DetectionRecord, family: str) -> tuple[int, int] | None:
    if family != "qwen2_5_vl":
        return None
    low, high = limits_of_processor(processor)
    return smart_resize(record.height, record.width, min_pixels=low, max_pixels=high)


def image_tokens(processor, width: int, height: int) -> int:
    """LLM tokens an image of width x height becomes: (H/28) x (W/28) after Qwen's smart resize."""
    sub = processor.image_processor
    factor = getattr(sub, "patch_size", 14) * getattr(sub, "merge_size", 2)
    low, high = limits_of_processor(processor)
    h, w = smart_resize(height, width, factor=factor, min_pixels=low, max_pixels=high)
    return (h // factor) * (w // factor)


def batching_order(processor, records: list[DetectionRecord]) -> list[int]:
    """Record indices, largest image first, so that a batch holds images of one size and pads little.

    Largest first also meets an out-of-memory batch at once rather than at the end of a long run.
    """
    tokens = [image_tokens(processor, r.width, r.height) for r in records]
    return sorted(range(len(records)), key=lambda i: -tokens[i])


def eval_batch_size(
    free_bytes: int,
    shape,
    prompt_tokens: int,
    max_new_tokens: int,
    weights_loaded: bool = True,
    headroom: float = EVAL_MEMORY_HEADROOM,
    cap: int = MAX_EVAL_BATCH,
) -> int:
    """Images per generate() call that fit in `free_bytes` of GPU memory (at least 1, at most `cap`).

    `shape` is the model's src.planning.parameters.ModelShape; `prompt_tokens` the longest prompt (text and
    image tokens); see src.planning.evaluation.eval_bytes_per_image. `weights_loaded=False` (free memory
    read before loading the model) subtracts the bf16 weights first (src.planning.memory.weight_bytes).
    """
    from src.planning.evaluation import eval_bytes_per_image
    from src.planning.memory import weight_bytes

    if not weights_loaded:
        free_bytes -= weight_bytes(shape, quantized=False)
    per_image = eval_bytes_per_image(shape, prompt_tokens, max_new_tokens)
    return max(1, min(cap, int(free_bytes * headroom // per_image)))


def auto_batch_size(
    model, processor, records: list[DetectionRecord], device: str, prompt: str, max_new_tokens: int
) -> int:
    """eval_batch_size for the loaded model on this GPU; CPU_EVAL_BATCH on the CPU."""
    if not str(device).startswith("cuda") or not records:
        return CPU_EVAL_BATCH

    from src.planning.parameters import ModelShape

    shape = ModelShape.from_config(model.config.to_dict())
    from src.utils.gpu import unallocated_gpu_bytes

    free = unallocated_gpu_bytes()  # within the launcher's reservation when the GPU is shared
    text = _prompt_texts(processor, 1, prompt)[0]
    text_tokens = len(processor.tokenizer(text)["input_ids"])
    longest = text_tokens + max(image_tokens(processor, r.width, r.height) for r in records)
    return eval_batch_size(free, shape, longest, max_new_tokens)


def _clean(text: str, pad_token: str | None) -> str:
    """The answer without trailing padding (parse_answer ignores it anyway; reports read better)."""
    if pad_token:
        text = text.replace(pad_token, "")
    return text.strip()


@dataclass
class GenerationStats:
    """What decoding cost: summed over generate() calls; tokens are those up to each answer's end."""

    images: int = 0
    decoded_tokens: int = 0  # answer tokens, the end token included, padding after it not
    decoding_steps: int = 0  # per batch, its longest answer: what generate() actually ran
    generate_seconds: float = 0.0
    batches: int = 0
    batch_size: int = 0  # images per generate() call asked for (the last batch can hold fewer)
    cut: list[bool] = field(default_factory=list)  # per image, in generation order: hit max_new_tokens

    def add(self, images: int, decoded: int, steps: int, seconds: float) -> None:
        self.images += images
        self.decoded_tokens += decoded
        self.decoding_steps += steps
        self.generate_seconds += seconds
        self.batches += 1

    def summary(self) -> dict:
        seconds = self.generate_seconds
        return {
            "batch_size": self.batch_size,
            "images": self.images,
            "batches": self.batches,
            "decoded_tokens": self.decoded_tokens,
            "decoding_steps": self.decoding_steps,
            "generate_seconds": round(seconds, 3),
            "images_per_s": round(self.images / seconds, 3) if seconds else None,
            "decoded_tokens_per_s": round(self.decoded_tokens / seconds, 1) if seconds else None,
            "truncated": sum(self.cut),
        }


def _end_ids(tokenizer) -> list[int]:
    ids = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    return [i for i in ids if i is not None and i != tokenizer.unk_token_id]


def answer_lengths(new_tokens, end_ids: list[int]) -> list[int]:
    """Tokens each row decoded, up to and including its first end token (all of them if none)."""
    lengths = []
    for row in new_tokens.tolist():
        ends = [i for i, token in enumerate(row) if token in end_ids]
        lengths.append(ends[0] + 1 if ends else len(row))
    return lengths


def answers_cut(new_tokens, end_ids: list[int]) -> list[bool]:
    """Per row: True when it holds no end token, i.e. max_new_tokens cut the answer off."""
    return [not any(token in end_ids for token in row) for row in new_tokens.tolist()]


def generate_answers(
    model,
    processor,
    images: list,
    device: str = "cpu",
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    stats: GenerationStats | None = None,
    decode: str = "plain",
    fast_attention: bool = FAST_ATTENTION,
) -> list[str]:
    """Greedy answers (special tokens kept) for one batch of PIL images.

    generate() stops at the step where every row has produced an end token (<|im_end|> or
    <|endoftext|>); rows that ended earlier are padded. decode="static" asks for a static KV cache,
    with which transformers compiles the decoding step on a GPU (see DECODE_MODES); fast_attention: see
    FAST_ATTENTION (it switches the model's attention functions, and leaves them switched).
    """
    import torch

    use_fast_attention(model, fast_attention)

    tokenizer = processor.tokenizer
    previous_side, tokenizer.padding_side = tokenizer.padding_side, "left"  # new tokens follow the prompt
    try:
        batch = processor(
            text=_prompt_texts(processor, len(images), prompt),
            images=images,
            padding=True,
            return_tensors="pt",
        )
    finally:
        tokenizer.padding_side = previous_side
    batch = batch.to(device)
    end_ids = _end_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_ids[-1]
    extra = {"cache_implementation": "static"} if decode == "static" else {}
    started = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=end_ids,
            pad_token_id=pad_id,
            **extra,
        )
    new_tokens = output[:, batch["input_ids"].shape[1] :].cpu()  # the copy waits for the GPU
    if stats is not None:
        lengths = answer_lengths(new_tokens, end_ids + [pad_id])
        stats.add(len(images), sum(lengths), new_tokens.shape[1], time.perf_counter() - started)
        stats.cut += answers_cut(new_tokens, end_ids + [pad_id])
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=False)
    return [_clean(text, tokenizer.pad_token) for text in texts]


def _prediction(
    record: DetectionRecord, text: str, processor, family: str, truncated: bool = False
) -> Prediction:
    answer = parse_answer(text, record.width, record.height, family, _resized(processor, record, family))
    return Prediction(
        image=str(record.image) if isinstance(record.image, (str, Path)) else record.where,
        width=record.width,
        height=record.height,
        truths=list(record.boxes),
        boxes=answer.boxes,
        text=text,
        parsed=answer.parsed,
        malformed=answer.malformed,
        crowd=list(record.crowd_boxes),
        truncated=truncated,
    )


def predict_records(
    model,
    processor,
    records: list[DetectionRecord],
    family: str = "qwen2_vl",
    device: str = "cpu",
    batch_size: int | str = CPU_EVAL_BATCH,
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    sort_by_size: bool = True,
    decode: str = "plain",
    stats: GenerationStats | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    fast_attention: bool = FAST_ATTENTION,
) -> list[Prediction]:
    """One Prediction per record, in the records' order; answers nothing can be read from count as unparsed.

    batch_size "auto" sizes batches from free GPU memory (eval_batch_size; CPU_EVAL_BATCH on the CPU).
    sort_by_size batches images of similar token counts together (batching_order). on_progress(done,
    total) is called before the first batch and after each one. fast_attention: see generate_answers.
    """
    from src.data.collators import load_image

    if batch_size == "auto":
        batch_size = auto_batch_size(model, processor, records, device, prompt, max_new_tokens)
        log.info("batch size %d (from free memory)", batch_size)
    stats = stats if stats is not None else GenerationStats()  # it also carries which answers were cut
    stats.batch_size = batch_size
    order = batching_order(processor, records) if sort_by_size and processor is not None else None
    order = order or list(range(len(records)))
    texts: dict[int, str] = {}
    cut: dict[int, bool] = {}
    if on_progress:
        on_progress(0, len(records))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        images = [_load(records[i], load_image) for i in chunk]
        before = len(stats.cut)
        answers = generate_answers(
            model,
            processor,
            images,
            device,
            prompt,
            max_new_tokens,
            stats=stats,
            decode=decode,
            fast_attention=fast_attention,
        )
        texts.update(zip(chunk, answers, strict=True))
        flags = stats.cut[before:]
        cut.update(zip(chunk, flags if len(flags) == len(chunk) else [False] * len(chunk), strict=True))
        log.info("predicted %d/%d", len(texts), len(records))
        if on_progress:
            on_progress(len(texts), len(records))
    return [_prediction(record, texts[i], processor, family, cut[i]) for i, record in enumerate(records)]


def use_fast_attention(model, on: bool) -> None:
    """Switch `model`'s LLM and vision attention to the fast calls (on) or to their own SDPA (off)."""
    from src.models.decode_attention import use_packed_decode_attention
    from src.models.vision_attention import VARLEN_NAMES, use_varlen_vision_attention, vision_configs

    use_packed_decode_attention(model, on)
    vision = vision_configs(model)
    if on and any(config._attn_implementation not in VARLEN_NAMES for config in vision):
        use_varlen_vision_attention(model)
    elif not on:
        for config in vision:
            if config._attn_implementation in VARLEN_NAMES:
                config._attn_implementation = "sdpa"


def _load(record: DetectionRecord, load_image):
    return load_image(str(record.image) if isinstance(record.image, Path) else record.image)

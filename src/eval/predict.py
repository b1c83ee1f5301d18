"""Greedy detection predictions of a model on held-out records: boxes, raw text, parsed flag.

Works on any model the worker can start from or write:
  * a full model directory (the base model, for the zero-shot baseline, or a merged model);
  * a PEFT adapter directory (`OUT/adapter/`, r3's `OUT/stage2-llm/adapter/`): its
    `adapter_config.json` names the base (for r3 that is `OUT/stage1-vision/merged`), which is
    loaded in full precision and the adapter applied on top.

    from src.eval.predict import load_for_eval, predict_records
    model, processor, family = load_for_eval("outputs/r4-joint/adapter", device="cpu")
    predictions = predict_records(model, processor, records, family, device="cpu", batch_size=8)

Generation is batched with left padding and greedy; answers are decoded with
skip_special_tokens=False (the box tokens are special tokens) and read by
`src.data.boxes.parse_answer`, which never raises: a garbled or cut-off answer is kept as an
unparsed prediction, never an error. `python -m src.eval.evaluate` is the command-line entry point.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from src.data.boxes import Box, parse_answer, smart_resize
from src.data.dataset import DEFAULT_PROMPT, DetectionRecord, processor_pixel_limits

log = logging.getLogger(__name__)
ADAPTER_CONFIG = "adapter_config.json"
DEFAULT_MAX_NEW_TOKENS = 256  # about eight objects in Qwen2-VL's format


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


def load_for_eval(model_path: str | Path, device: str = "cpu", search_root: str | Path | None = None):
    """(model in eval mode, processor, family) for a model dir, an adapter dir or a hub id.

    An adapter is applied to its base loaded in full precision (bf16 on GPUs, fp32 on the CPU), even
    when it was trained on a 4-bit base (r1, r3 stage 2): evaluating a QLoRA adapter on the
    unquantized weights is standard and avoids bitsandbytes at eval time; the scores can differ
    slightly from the 4-bit model's (the demo's tiny r1: precision 0.22 here, 0.25 on its 4-bit base).
    The adapter is merged in, so generation pays no LoRA overhead.
    """
    from src.models.loader import load_model, load_processor, model_family

    base, adapter = resolve_model(model_path, search_root)
    model = load_model(base, device)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    # The worker saves the processor beside the adapter; an adapter saved without one uses the base's.
    processor_dir = adapter if adapter and Path(adapter, "tokenizer_config.json").is_file() else base
    processor = load_processor(processor_dir)
    model.eval()
    return model, processor, model_family(base)


def _prompt_texts(processor, count: int, prompt: str) -> list[str]:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return [text] * count


def _resized(processor, record: DetectionRecord, family: str) -> tuple[int, int] | None:
    if family != "qwen2_5_vl":
        return None
    low, high = processor_pixel_limits(processor)
    return smart_resize(record.height, record.width, min_pixels=low, max_pixels=high)


def _clean(text: str, pad_token: str | None) -> str:
    """The answer without trailing padding (parse_answer ignores it anyway; reports read better)."""
    if pad_token:
        text = text.replace(pad_token, "")
    return text.strip()


def generate_answers(
    model,
    processor,
    images: list,
    device: str = "cpu",
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> list[str]:
    """Greedy answers (special tokens kept) for one batch of PIL images."""
    import torch

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
    end_ids = [i for i in tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]) if i is not None]
    with torch.inference_mode():
        output = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=end_ids,
            pad_token_id=tokenizer.pad_token_id,
        )
    new_tokens = output[:, batch["input_ids"].shape[1] :]
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=False)
    return [_clean(text, tokenizer.pad_token) for text in texts]


def predict_records(
    model,
    processor,
    records: list[DetectionRecord],
    family: str = "qwen2_vl",
    device: str = "cpu",
    batch_size: int = 8,
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> list[Prediction]:
    """One Prediction per record, in order; answers nothing can be read from count as unparsed."""
    from src.data.collators import load_image

    predictions: list[Prediction] = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        images = [load_image(str(r.image) if isinstance(r.image, Path) else r.image) for r in chunk]
        texts = generate_answers(model, processor, images, device, prompt, max_new_tokens)
        for record, text in zip(chunk, texts, strict=True):
            answer = parse_answer(
                text, record.width, record.height, family, _resized(processor, record, family)
            )
            predictions.append(
                Prediction(
                    image=str(record.image) if isinstance(record.image, (str, Path)) else record.where,
                    width=record.width,
                    height=record.height,
                    truths=list(record.boxes),
                    boxes=answer.boxes,
                    text=text,
                    parsed=answer.parsed,
                    malformed=answer.malformed,
                )
            )
        log.info("predicted %d/%d", len(predictions), len(records))
    return predictions

"""Batch conversations for training: run the processor, then decide which tokens carry loss.

* AllTokensCollator labels every token except padding and the vision tokens (image/video pads
  and the vision start/end markers), which the model cannot predict.
* AssistantOnlyCollator labels only the assistant's answers, each with its closing <|im_end|>,
  so the loss is spent on boxes rather than on the fixed prompt.
Both keep `mm_token_type_ids`, which Qwen2-VL's M-RoPE needs.
"""

from __future__ import annotations

IGNORE_INDEX = -100
VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")
ASSISTANT_HEADER = "<|im_start|>assistant\n"
END_OF_TURN = "<|im_end|>"


def load_image(image):
    """A PIL image in RGB from a path or an image object."""
    from PIL import Image

    if isinstance(image, str):
        with Image.open(image) as opened:
            return opened.convert("RGB")
    return image.convert("RGB")


class AllTokensCollator:
    """Loss on every real text token of the conversation."""

    def __init__(self, processor, positions=None):
        self.processor = processor
        # Optional function that adds the model's `position_ids` to a CPU batch (training on a GPU:
        # src/training/host_positions.py), so the model does not work them out with GPU reads.
        self.positions = positions
        tokenizer = processor.tokenizer
        self.pad_id = tokenizer.pad_token_id
        self.vision_ids = [i for i in tokenizer.convert_tokens_to_ids(list(VISION_TOKENS)) if i is not None]

    def __call__(self, examples: list[dict]) -> dict:
        texts = [self.processor.apply_chat_template(ex["messages"], tokenize=False) for ex in examples]
        images = [load_image(image) for ex in examples for image in ex.get("images") or []]
        batch = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")
        batch["labels"] = self.labels_for(batch["input_ids"], batch["attention_mask"])
        if self.positions is not None:
            self.positions(batch)
        return batch

    def labels_for(self, input_ids, attention_mask):
        import torch

        labels = input_ids.clone()
        labels[attention_mask == 0] = IGNORE_INDEX
        labels[torch.isin(input_ids, torch.tensor(self.vision_ids))] = IGNORE_INDEX
        return labels


class AssistantOnlyCollator(AllTokensCollator):
    """Loss on the assistant's answer tokens and their end-of-turn token only."""

    def __init__(self, processor, positions=None):
        super().__init__(processor, positions)
        tokenizer = processor.tokenizer
        self.header_ids = tokenizer(ASSISTANT_HEADER, add_special_tokens=False)["input_ids"]
        self.end_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)

    def labels_for(self, input_ids, attention_mask):
        labels = input_ids.new_full(input_ids.shape, IGNORE_INDEX)
        for row, ids in enumerate(input_ids.tolist()):
            for start, end in self.assistant_spans(ids):
                labels[row, start:end] = input_ids[row, start:end]
        labels[attention_mask == 0] = IGNORE_INDEX
        return labels

    def assistant_spans(self, ids: list[int]) -> list[tuple[int, int]]:
        """[start, end) of each answer: after the assistant header, through <|im_end|>."""
        spans, width, i = [], len(self.header_ids), 0
        while i <= len(ids) - width:
            if ids[i : i + width] == self.header_ids:
                start = i + width
                end = ids.index(self.end_id, start) + 1 if self.end_id in ids[start:] else len(ids)
                spans.append((start, end))
                i = end
            else:
                i += 1
        return spans

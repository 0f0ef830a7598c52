"""Captioners: turn a batch of RGB images into prompts. Selected by name from the caption config.

Every captioner has an ``id`` (stored in the cache key) and a ``question``; MLLM captioners also a
``revision``. ``trust_remote_code`` is only ever passed when the config says so explicitly.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from PIL import Image

from xpsr.captions.heuristic import describe, measure

PAPER_CONTENT_QUESTION = "Please provide a descriptive summary of the content of this image."
PAPER_QUALITY_QUESTION = ("Please describe the quality of this image and evaluate it based on factors such as "
                          "clarity, color, noise, and lighting")
LLAVA_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"
# Images more elongated than this are centre-cropped to it before an MLLM's processor sees them. LLaVA-1.5's
# processor resizes the short side to 336 px and keeps the centre square, so the crop changes nothing it sees,
# while a 1x3000 strip would otherwise be resized to 336x1,008,000 px (GBs) before that centre crop.
MAX_MLLM_ASPECT = 4.0


def centre_crop_to_aspect(img: np.ndarray, max_aspect: float = MAX_MLLM_ASPECT) -> np.ndarray:
    """The centre of ``img`` with its long side at most ``max_aspect`` x its short side (a view, no copy)."""
    h, w = img.shape[:2]
    if w > max_aspect * h:
        keep = max(int(max_aspect * h), 1)
        return img[:, (w - keep) // 2:(w - keep) // 2 + keep]
    if h > max_aspect * w:
        keep = max(int(max_aspect * w), 1)
        return img[(h - keep) // 2:(h - keep) // 2 + keep]
    return img


class Captioner(Protocol):
    id: str
    question: str
    revision: str | None

    def caption(self, images: list[np.ndarray]) -> list[str]: ...


class HeuristicCaptioner:
    """Quality prompts from measured statistics (offline, no weights)."""

    id = "heuristic-v1"
    question = "measured statistics"
    revision = None

    def caption(self, images: list[np.ndarray]) -> list[str]:
        return [describe(measure(img)) for img in images]


class FixedCaptioner:
    """The same text for every image (``''`` for the `empty` captioner): content-prompt ablations."""

    revision = None

    def __init__(self, text: str = ""):
        self.text = text
        self.id = "empty" if text == "" else f"fixed:{text}"
        self.question = "fixed"

    def caption(self, images: list[np.ndarray]) -> list[str]:
        return [self.text for _ in images]



class MLLMCaptioner:
    """Any transformers image-text-to-text model (LLaVA-1.5 by default), batched, greedy by default."""

    def __init__(self, model: str, question: str, kind: str = "llava", template: str | None = LLAVA_TEMPLATE,
                 dtype: str = "fp16", device: str = "cpu", max_new_tokens: int = 77, num_beams: int = 1,
                 revision: str | None = None, trust_remote_code: bool = False):
        from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

        cls = LlavaForConditionalGeneration if kind == "llava" else AutoModelForImageTextToText
        self.device = torch.device(device)
        from xpsr.models.build import DTYPES

        torch_dtype = DTYPES[dtype] if self.device.type != "cpu" or dtype == "bf16" else torch.float32
        try:
            self.processor = AutoProcessor.from_pretrained(model, revision=revision,
                                                           trust_remote_code=trust_remote_code)
            self.model = cls.from_pretrained(model, revision=revision, dtype=torch_dtype,
                                             trust_remote_code=trust_remote_code).to(self.device).eval()
        except OSError as e:
            raise FileNotFoundError(
                f"could not load the captioning model {model!r} ({str(e).splitlines()[0]}). Give a local folder "
                "(e.g. a download of llava-hf/llava-1.5-7b-hf) or use captioner=heuristic offline."
            ) from e
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.padding_side = "left"  # generation continues from the right end of every row
        self.question, self.template = question, template
        self.max_new_tokens, self.num_beams = max_new_tokens, num_beams
        self.revision = revision or getattr(self.model.config, "_commit_hash", None)
        self.id = f"{kind}:{model}"

    def _prompt(self) -> str:
        if self.template:
            return self.template.format(question=self.question)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.question}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    @torch.no_grad()
    def caption(self, images: list[np.ndarray]) -> list[str]:
        pil = [Image.fromarray(np.ascontiguousarray(centre_crop_to_aspect(img))) for img in images]
        inputs = self.processor(images=pil, text=[self._prompt()] * len(pil), padding=True, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                  num_beams=self.num_beams)
        new_tokens = out[:, inputs["input_ids"].shape[1]:]  # only the answer: the chat template is dropped
        texts = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        return [t.split("ASSISTANT:")[-1].strip() for t in texts]

"""Schemas of the captioning stage: ``xpsr caption`` and the prompt-cache tools."""
from __future__ import annotations

from dataclasses import dataclass

from xpsr.config.rules import DEVICE, choice, doc


@dataclass
class CaptionConfig:
    """`xpsr caption`: write content or quality prompts of a folder of images into the prompt cache."""

    images: str = doc("???", "folder of images to caption (recursive)", nonempty=True)
    cache: str = doc("???", "prompt cache file (SQLite)", nonempty=True)
    kind: str = choice("quality", ("content", "quality"), "which prompt this run writes")
    captioner: str = choice("heuristic", ("llava", "quality", "heuristic", "fixed", "empty"),
                            "llava / quality: an MLLM; heuristic: offline statistics; fixed/empty: ablations")
    model: str = doc("llava-hf/llava-1.5-7b-hf", "MLLM: local folder or hub id")
    revision: str | None = doc(None, "MLLM hub revision")
    question: str | None = doc(None, "question to the MLLM; null = the paper's question for `kind`")
    template: str | None = doc("USER: <image>\n{question} ASSISTANT:",
                               "prompt template with {question}; null = the processor's chat template")
    fixed_text: str = doc("", "text of the `fixed` captioner")
    image_source: str = choice("lr", ("lr", "hr"), "which image of a pair is captioned (recorded with the prompt)")
    batch_size: int = doc(8, "images per generate call (halved automatically on out-of-memory)",
                         min=1)
    max_new_tokens: int = doc(77, "longest answer in tokens", min=1)
    num_beams: int = doc(1, "1 = greedy decoding", min=1)
    dtype: str = choice("fp16", ("fp16", "bf16", "fp32"), "MLLM weights dtype (fp32 on CPU)")
    device: str = doc("auto", "'auto' (the accelerate process's device), 'cpu', 'cuda'", device=DEVICE)
    trust_remote_code: bool = doc(False, "allow models that ship their own code (only if you trust them)")
    pause_s: float = doc(0.0, "sleep after each batch (shared machines, rate limits, crash tests)", min=0)


@dataclass
class CaptionExportConfig:
    cache: str = doc("???", "prompt cache file", nonempty=True)
    output: str = doc("???", "JSONL file to write", nonempty=True)


@dataclass
class CaptionRepairConfig:
    cache: str = doc("???", "the damaged prompt cache (read from a copy, never modified)", nonempty=True)
    output: str = doc("???", "a new file for the readable rows: a prompt cache (.sqlite) or JSON lines (.jsonl)",
                      nonempty=True)


@dataclass
class CaptionMergeConfig:
    cache: str = doc("???", "the prompt cache whose per-rank shards (CACHE.shards/) are merged into it", nonempty=True)
    kind: str | None = choice(None, (None, "content", "quality"), "merge the shards of one kind; null = all")
    timeout_s: float = doc(600.0, "wait at most this long for a merge running elsewhere (its lock file)", min=0)


@dataclass
class CaptionImportConfig:
    cache: str = doc("???", "prompt cache file (created if missing)", nonempty=True)
    jsonl: str | None = doc(None, "JSONL written by caption-export")
    official_lr: str | None = doc(None, "official layout: an LR/ folder with highlevel_prompt/ and "
                                        "lowlevel_prompt_q/ beside it")

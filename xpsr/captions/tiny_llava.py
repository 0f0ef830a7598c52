"""A tiny random LLaVA (vision tower, projector, Llama) saved as a local folder: tests and offline demos."""
from __future__ import annotations

from pathlib import Path


def build_tiny_llava(folder: str | Path, seed: int = 0) -> Path:
    """Write a few-MB LLaVA-1.5-shaped model + processor to ``folder``; loads with ``from_pretrained``."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    folder = Path(folder)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_byte_level_bpe(), unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>",
                                        extra_special_tokens={"image_token": "<image>"})
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                         do_center_crop=True, do_resize=True)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               num_additional_image_tokens=1,  # the CLS token, dropped by "default"
                               vision_feature_select_strategy="default")
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=32, patch_size=8),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
_CORPUS = "USER: describe the content and quality of this image. ASSISTANT: a blurry photo"


def _byte_level_bpe():
    """A byte-level BPE (Llama-tokenizer-like) over the corpus above: specials, the 256 byte symbols, then
    merges learnt in pure Python (xpsr.models.tiny_bpe), so the ids are the same in every process."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from xpsr.models.tiny_bpe import build_vocab, byte_alphabet, learn_merges

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    words = [w for w, _ in pre.pre_tokenize_str(_CORPUS)]  # already in byte symbols ('Ġdescribe')
    merges = learn_merges(words, 300, min_frequency=1)
    tok = Tokenizer(models.BPE(vocab=build_vocab(_SPECIALS + byte_alphabet(), merges), merges=merges,
                               unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(_SPECIALS)
    return tok

"""The VLM of the prompt-based baselines: LLaVA-1.5-7B (App F) or a tiny LLaVA built offline from configs."""
from __future__ import annotations

import gc
from pathlib import Path

import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from ..config import ModelsConfig
from ..runtime import seeded
from .weights import check_builder, load_pretrained, require_weights, vlm_entry

# llava-hf/llava-1.5-*-hf's chat_template.json: "USER: <image>\n<text> ASSISTANT:"
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")

TINY_IMAGE_SIZE, TINY_PATCH = 32, 8


def byte_tokenizer() -> LlamaTokenizer:
    """A byte-level Llama tokenizer built in memory: <unk> <s> </s>, the 256 byte tokens, '▁', <pad>, <image>."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}, "▁": 259}
    tok = LlamaTokenizer(vocab=vocab, merges=[])
    tok.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<image>"]})
    return tok


def tiny_llava_config(tok: LlamaTokenizer) -> LlavaConfig:
    """LLaVA-1.5's architecture (CLIP vision tower, 2-layer GELU projector, Llama) with tiny widths."""
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=TINY_IMAGE_SIZE, patch_size=TINY_PATCH, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                       vision_feature_select_strategy="default", vision_feature_layer=-2,
                       projector_hidden_act="gelu")


def tiny_processor(tok: LlamaTokenizer | None = None) -> LlavaProcessor:
    """LlavaProcessor of the tiny LLaVA: CLIPImageProcessor at 32 px, the byte tokenizer, LLaVA-1.5's template."""
    size = TINY_IMAGE_SIZE
    images = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(image_processor=images, tokenizer=tok or byte_tokenizer(), patch_size=TINY_PATCH,
                          vision_feature_select_strategy="default", chat_template=LLAVA_CHAT_TEMPLATE,
                          num_additional_image_tokens=1)


def vlm_dtype(device: str, dtype: str = "auto") -> torch.dtype:
    """bf16 on CUDA where supported (else fp16), fp32 elsewhere; "fp32" / "fp16" / "bf16" force one."""
    named = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype in named:
        return named[dtype]
    if dtype != "auto":
        raise ValueError(f"vlm.dtype={dtype!r}: valid values are auto, {', '.join(named)}")
    if not device.startswith("cuda"):
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def dtype_name(dtype: torch.dtype) -> str:
    """"float32", "bfloat16", ...: a dtype as plans and fingerprints record it."""
    return str(dtype).removeprefix("torch.")


def named_dtype(name: str) -> torch.dtype:
    """The torch dtype a plan recorded (dtype_name's inverse)."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype {name!r}: expected a torch dtype name such as float32 or bfloat16")
    return dtype


def build_vlm(models: ModelsConfig, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(LlavaForConditionalGeneration, processor) in eval mode; the processor's tokenizer pads on the left."""
    if check_builder(models) == "tiny":
        processor = tiny_processor()
        with seeded(models.seed):
            model = LlavaForConditionalGeneration(tiny_llava_config(processor.tokenizer))
    else:
        folder = Path(require_weights(vlm_entry(models))[0]).parent  # the snapshot holding config.json
        model = load_pretrained(LlavaForConditionalGeneration, folder, dtype=dtype)
        from transformers import AutoProcessor  # noqa: I001 - only the paper path reads a processor folder

        processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"  # batched generation: every prompt ends where generation starts
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False), processor


class LazyVlm:
    """The VLM of one notebook run: built on first get() (a run whose tags are done loads nothing), and freed by
    release() before the next model needs the GPU (LLaVA-1.5-7B holds ~14 GB in bf16)."""

    def __init__(self, models: ModelsConfig, device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.models, self.device, self.dtype = models, device, dtype
        self._pair: tuple | None = None
        self.builds = 0  # how often it was built (a run that needs no tagging builds it 0 times)

    @property
    def loaded(self) -> bool:
        return self._pair is not None

    def get(self) -> tuple:
        """(model, processor), built now if needed; callers keep no reference, so release() can free it."""
        if self._pair is None:
            self._pair = build_vlm(self.models, self.device, self.dtype)
            self.builds += 1
        return self._pair

    def release(self) -> None:
        """Drop the model, collect it and hand CUDA's cached blocks back, so that SD gets the memory."""
        self._pair = None
        gc.collect()  # the model's reference cycles (hooks, generation config) go now, not at some later gc pass
        if str(self.device).startswith("cuda") and torch.cuda.is_available():
            torch.cuda.empty_cache()

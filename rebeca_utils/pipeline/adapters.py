"""LoRA adapters kept resident in a decoding pipeline by name: loaded once, switched, deleted after their last use."""
from __future__ import annotations

import hashlib
from typing import Sequence

from ..models.weights import quiet_libraries
from .items import WorkItem


def frozen_eval(pipe) -> None:
    """Every module of the decoding pipeline in eval mode (after adapters are loaded: theirs start in train mode)."""
    for name in ("unet", "text_encoder", "text_encoder_2", "vae", "image_encoder"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.eval()


class Adapters:
    """LoRA adapters resident in the pipeline by name: loaded once, switched with set_adapters, deleted after the
    last batch of this process that uses them (at most `max_resident` at a time), so none outlives decode()."""

    def __init__(self, pipe, batches: Sequence[list[WorkItem]], max_resident: int = 4):
        self.pipe, self.max_resident, self.loaded, self.enabled = pipe, max_resident, {}, True
        self.last = {b[0].lora: i for i, b in enumerate(batches) if b[0].lora}

    def use(self, wanted: str | None) -> None:
        """Make `wanted` (an adapter folder) the active adapter, or none (base weights) for None."""
        if not wanted:
            if self.loaded and self.enabled:
                self.pipe.disable_lora()  # a batch without LoRA between LoRA batches: base weights only
                self.enabled = False
            return
        if wanted not in self.loaded:
            while len(self.loaded) >= self.max_resident:
                self._delete(next(iter(self.loaded)))  # the oldest first
            name = "lora_" + hashlib.sha256(wanted.encode()).hexdigest()[:12]
            try:
                with quiet_libraries():  # "No LoRA keys associated to CLIPTextModel": UNet-only adapters
                    self.pipe.load_lora_weights(wanted, adapter_name=name)
            except Exception:
                if name in self.pipe.get_list_adapters().get("unet", []):
                    self.pipe.delete_adapters([name])  # a half-loaded adapter must not stay behind
                raise
            self.loaded[wanted] = name
        if not self.enabled:
            self.pipe.enable_lora()
            self.enabled = True
        self.pipe.set_adapters([self.loaded[wanted]])
        frozen_eval(self.pipe)  # peft made the new lora_dropout modules in training mode: images would vary

    def done(self, i: int) -> None:
        """After batch i: delete the adapters no later batch of this process needs."""
        for path in [p for p in self.loaded if self.last.get(p, -1) <= i]:
            self._delete(path)

    def close(self) -> None:
        """Delete every adapter still loaded: the pipeline is the base model again."""
        for path in list(self.loaded):
            self._delete(path)

    def _delete(self, path: str) -> None:
        if len(self.loaded) == 1 and not self.enabled:
            self.pipe.enable_lora()  # while an adapter is still loaded: a later load must not start disabled
            self.enabled = True
        self.pipe.delete_adapters([self.loaded.pop(path)])

"""Baselines (§4.3.1): the LoRA recipe (lora_recipe), its training loop and format (lora), the runner and CLI (lora_cli)."""

"""Baselines REBECA is compared against (§4.3.1): per-user and shared LoRA (`lora`, `lora_cli`)."""

"""Network modules for --network_module: networks.lora (LoRA / LoCon); base.py holds the plug-in protocol."""

"""The ``lora-lens`` command line: thin click adapters over the lora_lens API."""

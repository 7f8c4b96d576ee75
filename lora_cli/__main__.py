"""`python -m lora_cli` (and `accelerate launch -m lora_cli train RECIPE`)."""

from lora_cli.cli import main

main()

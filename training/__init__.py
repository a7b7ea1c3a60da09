"""The GPT model, the shard loader, the DeepSpeed training loop, export, generation and fine-tuning."""

"""Remote-sensing vision-language models: registry, checkpoint loading, inference, decoding."""

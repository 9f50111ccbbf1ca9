"""The decoder, its config, rope, presets, tokenizers, checkpoint reading and export."""

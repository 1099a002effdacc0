"""Model families under STADI, one self-contained module each (processor, injection plan, band model, pipeline)."""

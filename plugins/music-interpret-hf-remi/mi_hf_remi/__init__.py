"""Music Interpret plugin: a second model adapter, a HuggingFace causal LM over MidiTok REMI tokens."""

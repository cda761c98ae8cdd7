"""llama.cpp in this process: worker backends, the saved KV state cache, the demo model."""

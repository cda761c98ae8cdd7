"""Generation: the request/stream API and the fair scheduler; `local/` runs llama.cpp in this process."""

"""Metharme prompts: template, builder, neutralisation, stop strings. Pure: no I/O, no discord, no persistence."""

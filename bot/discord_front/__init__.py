"""The discord.py front end: client, message intake, replies, errors, permissions, cooldowns, recovery."""

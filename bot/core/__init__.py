"""The roleplay domain without Discord: chat sessions, personas, channel settings."""

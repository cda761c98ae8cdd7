"""The roleplay domain without Discord: chat sessions, personas, character cards, channel settings."""

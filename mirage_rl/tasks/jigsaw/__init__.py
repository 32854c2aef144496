"""Jigsaw (BLINK's format): a photo with its lower-right corner missing and two candidate pieces -> A or B."""

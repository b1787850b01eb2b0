"""Tasks: the commands the control center sends to devices, and their lifecycle."""

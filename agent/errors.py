"""Errors the agent reports to a user as one line (the CLI turns them into exit status 2)."""


class AgentInputError(Exception):
    """Bad input to the agent side (a model folder, a prompt, a request); the message says what to fix."""

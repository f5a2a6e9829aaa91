"""Exception types of the public API that callers may want to catch by class."""


class CheckpointError(ValueError):
    """A prefix file, PEFT adapter, reference checkpoint or bank directory that cannot be loaded: unreadable,
    truncated, inconsistent with its own metadata, or not fitting the model. The message names the file.
    Loading is all-or-nothing: when this is raised, the model (or server) is exactly as before the call."""

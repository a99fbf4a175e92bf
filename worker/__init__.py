"""guestkit-worker: runs VM-operation jobs, each in a fresh sandboxed child process."""

__version__ = "0.5.0"

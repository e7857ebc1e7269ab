"""rr: Reveal and Release — make an LLM forget a behaviour without being handed the data to forget."""

__version__ = "0.1.0"

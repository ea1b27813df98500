"""`peftkit serve`: an OpenAI-style HTTP server for one base model and many adapters, batched across adapters.

``add_arguments`` / ``main`` drive the command; ``peftkit.serve.app.build_app(model, tokenizer, adapters_dir,
limits)`` builds the FastAPI app in-process (it imports FastAPI, so it is not re-exported here).
"""
from .cli import add_arguments, main
from .limits import ServeLimits

__all__ = ["ServeLimits", "add_arguments", "main"]

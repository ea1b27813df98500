"""One file per method; importing a method module registers it."""
from . import lora  # noqa: F401  (registers LORA)

"""The simulated engine (`python -m kvctl.sim`): vLLM's or SGLang's HTTP API without a GPU."""

from kvctl.sim.app import create_app
from kvctl.sim.state import Settings

__all__ = ["Settings", "create_app"]

"""The simulated engine (`python -m kvctl.sim`): vLLM's or SGLang's HTTP API without a GPU.

Its settings (kvctl.sim.settings) are read by config and the sim adapter, so this package
imports nothing on its own: the server (kvctl.sim.app) is loaded only by the sim itself.
"""

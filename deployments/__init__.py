"""How flows are started: the local serve process and the GitHub webhook receiver."""

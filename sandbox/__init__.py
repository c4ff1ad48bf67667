"""The sandbox: the embedded default environment that runs the whole pipeline on one machine."""

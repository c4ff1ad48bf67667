"""Tests of the GitHub webhook receiver."""

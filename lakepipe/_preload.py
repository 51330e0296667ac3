"""Imported by the runner's fork server: loads every plug-in before workers fork."""

from lakepipe.runner import preload

preload()

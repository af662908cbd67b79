"""The console: the ``quantad`` command and its text views, on top of every other package."""

"""
regmirror: a pull-through cache for several container registries at once.

Run it with ``twistd regmirror -c etc/mirror.ini``; see README.rst.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"

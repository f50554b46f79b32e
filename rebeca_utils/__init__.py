"""REBECA kit: the package behind the notebooks, in subpackages by pipeline stage (see README "Where things live")."""

__version__ = "0.1.0"

"""u2zoo's version, in a leaf module: manifests record it, and importing the package root
(whose lazy ``segment``/``load`` reach up to ``u2zoo.api``) from below would point a layer up."""

__version__ = "0.1.0"

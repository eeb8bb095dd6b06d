"""jobz: distributed shell jobs behind Mongrel2, over ZeroMQ."""
__version__ = '0.1.0'

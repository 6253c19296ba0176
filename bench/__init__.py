"""sambench: reproduce the SAM and ASAM papers' tables (SGD vs SAM vs ASAM)."""
__version__ = "0.1.0"
